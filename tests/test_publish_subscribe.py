"""fastrelay publish / subscribe on loopback, the aioquic adapter and its priority hook.

- In memory: FastrelayQuicConnection serves streams by MoQ priority.
- Loopback, no relay of ours yet: fastrelay publish -> moq-rs's own server as relay (run via
  relay/interop/moq_rs.py server; our clients offer only `moq-00`, which forces draft-14) ->
  two fastrelay subscribers and one moq-rs subscriber, all verifying the same payloads.
- Loopback through our relay: two publishers -> `fastrelay relay` -> one `fastrelay subscribe`
  with two tracks on one connection.
Every process is ended by PID in `finally`; child output goes to files.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import StreamDataReceived

from relay.media import (
    PayloadHeader,
    PublishSummary,
    SubscribeSummary,
    TrackVerifier,
    encode_object,
)
from relay.moqt.constants import MOQT_VERSION_DRAFT_14, ObjectStatus, PublishDoneStatusCode
from relay.moqt.quic import (
    IP_MTU_DISCOVER,
    IPV6_MTU_DISCOVER,
    PMTUDISC_PROBE,
    FastrelayQuicConnection,
    TlsOptions,
    certificate_fingerprint,
    connect,
    generate_certificate,
    parse_url,
    serve,
    server_address,
)
from relay.moqt.session import (
    NamespacePublished,
    ObjectReceived,
    PublishDoneReceived,
    SubgroupStreamOpened,
    SubscribeAccepted,
    SubscribeRequested,
)
from relay.publisher import PublisherOptions, run_publisher
from relay.subscriber import SubscriberOptions, run_subscriber
from tests.children import child_env, stop_child
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
NAMESPACE = "demo/cam"
TRACK = "video"
OBJECTS = 150
GROUP_LENGTH = 15
SIZE = 800
RATE = 300


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    cert, key, fingerprint = generate_certificate(["localhost", LOOPBACK])
    folder = tmp_path_factory.mktemp("cert")
    (folder / "cert.pem").write_bytes(cert)
    (folder / "key.pem").write_bytes(key)
    return folder / "cert.pem", folder / "key.pem", fingerprint


# -- certificates and URLs ---------------------------------------------------------------------


def test_certificate_fingerprint(certificate: tuple[Path, Path, str]) -> None:
    cert, _, fingerprint = certificate
    assert len(fingerprint) == 64
    assert certificate_fingerprint(cert.read_bytes()) == fingerprint


def test_parse_url() -> None:
    url = parse_url("moqt://[::1]:4443/relay?x=1")
    assert (url.host, url.port, url.path, url.authority) == ("::1", 4443, "/relay?x=1",
                                                            "[::1]:4443")
    assert parse_url("moqt://relay.example").port == 443
    with pytest.raises(ValueError, match="is not a moqt://host:port/path URL"):
        parse_url("https://x/y")


# -- the priority hook, in memory --------------------------------------------------------------


def _handshake(client: QuicConnection, server: QuicConnection) -> None:
    client.connect((LOOPBACK, 1), now=0.0)
    for _ in range(10):
        moved = 0
        for src, dst in ((client, server), (server, client)):
            for data, _ in src.datagrams_to_send(now=0.0):
                dst.receive_datagram(data, (LOOPBACK, 1), now=0.0)
                moved += 1
        if not moved:
            break
    while client.next_event() is not None:
        pass
    while server.next_event() is not None:
        pass


def _first_flight_streams(cls: type[QuicConnection], cert: tuple[Path, Path, str],
                          prioritise: bool) -> list[int]:
    """Stream ids of the data the server receives in the client's first flight."""
    server_config = QuicConfiguration(is_client=False, alpn_protocols=["moq-00"])
    server_config.load_cert_chain(cert[0], cert[1])
    client_config = QuicConfiguration(is_client=True, alpn_protocols=["moq-00"])
    client_config.verify_mode = 0
    client = cls(configuration=client_config)
    server = QuicConnection(configuration=server_config,
                            original_destination_connection_id=client.original_destination_connection_id)
    _handshake(client, server)
    low, high = 2, 6  # created in this order: aioquic alone would serve `low` first
    priorities = {low: (255, 255), high: (0, 0)}
    if prioritise:
        assert isinstance(client, FastrelayQuicConnection)
        client.stream_priority = priorities.get
    client.send_stream_data(low, b"L" * 40_000)
    client.send_stream_data(high, b"H" * 40_000)
    order = []
    for data, _ in client.datagrams_to_send(now=0.1):  # one congestion window
        server.receive_datagram(data, (LOOPBACK, 1), now=0.1)
        while (event := server.next_event()) is not None:
            if isinstance(event, StreamDataReceived) and event.data:
                order.append(event.stream_id)
    return order


def test_priority_hook_serves_high_priority_first(certificate: tuple[Path, Path, str]) -> None:
    order = _first_flight_streams(FastrelayQuicConnection, certificate, prioritise=True)
    assert order and set(order) == {6}, order  # the first flight is all high-priority data
    # Control: stock aioquic serves in creation order and round-robin.
    stock = _first_flight_streams(QuicConnection, certificate, prioritise=False)
    assert stock[0] == 2 and 2 in stock


# -- adapter over loopback, both ends ours -----------------------------------------------------


@pytest.mark.parametrize("host", [LOOPBACK, "::1"])
def test_adapter_loopback_session(certificate: tuple[Path, Path, str], host: str) -> None:
    cert, key, fingerprint = certificate
    url_host = f"[{host}]" if ":" in host else host

    async def scenario() -> list[bytes]:
        def on_event(protocol, event) -> None:  # type: ignore[no-untyped-def]
            if isinstance(event, SubscribeRequested):
                protocol.session.accept_subscribe(event.request_id, 3)
                sender = protocol.session.open_subgroup(event.request_id, 0, 0, 0)
                sender.write(0, b"one")
                sender.write(1, b"two", end_stream=True)
                protocol.session.send_datagram(event.request_id, 1, 0, 0, b"dgram")

        server = await serve(host, 0, cert, key, lambda p: None, on_event=on_event)
        try:
            _, port = server_address(server)
            async with connect(f"moqt://{url_host}:{port}/t",
                               tls=TlsOptions(fingerprint=fingerprint)) as client:
                assert client.session.version == MOQT_VERSION_DRAFT_14
                # DF on both ends (RFC 9000 §14): no datagram leaves in fragments
                for transport in (server._transport, client._transport):
                    sock = transport.get_extra_info("socket")
                    level, option = ((socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER)
                                     if sock.family == socket.AF_INET6
                                     else (socket.IPPROTO_IP, IP_MTU_DISCOVER))
                    assert sock.getsockopt(level, option) == PMTUDISC_PROBE
                client.session.subscribe((b"a",), b"t")
                client.flush()
                payloads: list[bytes] = []
                deadline = time.monotonic() + 5
                while len(payloads) < 3 and time.monotonic() < deadline:
                    event = await client.next_event(timeout=1)
                    if isinstance(event, SubscribeAccepted):
                        assert event.track_alias == 3
                    elif isinstance(event, ObjectReceived):
                        payloads.append(event.payload)
                return payloads
        finally:
            server.close()

    assert sorted(asyncio.run(asyncio.wait_for(scenario(), 15))) == [b"dgram", b"one", b"two"]


def test_wrong_fingerprint_one_line_error(certificate: tuple[Path, Path, str],
                                          tmp_path: Path) -> None:
    cert, key, _ = certificate

    async def scenario() -> str:
        server = await serve(LOOPBACK, 0, cert, key, lambda p: None)
        try:
            _, port = server_address(server)
            try:
                async with connect(f"moqt://{LOOPBACK}:{port}/t",
                                   tls=TlsOptions(fingerprint="00" * 32), timeout=3):
                    return "connected"
            except Exception as exc:
                return str(exc)
        finally:
            server.close()

    message = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert message.startswith("MoQ session closed during setup: we closed with UNAUTHORIZED: "
                              "certificate fingerprint mismatch (server has "), message


# -- through moq-rs's server as the relay -------------------------------------------------------


def _first_line(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if "\n" in text:
            return text.splitlines()[0]
        assert proc.poll() is None, f"{proc.args!r} exited with {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError(f"no line from {proc.args!r} within {timeout} s")


def _json(path: Path) -> dict[str, object]:
    text = path.read_text().strip()
    assert text, f"{path.name} is empty; stderr: {path.with_suffix('.err').read_text()}"
    if text.startswith("{\n"):  # fastrelay --json: one indented object
        return json.loads(text)
    return json.loads(text.splitlines()[-1])  # moq-rs driver: JSON lines, summary last


@pytest.fixture
def moq_rs_relay(tmp_path: Path) -> Iterator[dict[str, object]]:
    pytest.importorskip("moq")
    out = tmp_path / "relay.out"
    with open(out, "w") as stdout, open(tmp_path / "relay.err", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay.interop.moq_rs", "server", "--bind", f"{LOOPBACK}:0",
             "--duration", "60"], cwd=REPO, env=child_env(), stdout=stdout, stderr=stderr)
    try:
        listening = json.loads(_first_line(out, proc, timeout=10))
        assert listening["event"] == "listening"
        yield listening
    finally:
        stop_child(proc)


def test_publish_through_moq_rs_relay_to_fastrelay_and_moq_rs_subscribers(
        moq_rs_relay: dict[str, object], tmp_path: Path) -> None:
    fingerprint = moq_rs_relay["fingerprints"][0]  # type: ignore[index]
    url = f"moqt://{moq_rs_relay['bind']}/fastrelay"
    common = ["--url", url, "--namespace", NAMESPACE, "--track", TRACK,
              "--fingerprint", str(fingerprint)]
    children: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(tmp_path / f"{name}.out", "w") as out, \
                open(tmp_path / f"{name}.err", "w") as err:
            proc = subprocess.Popen(argv, cwd=REPO, env=child_env(), stdout=out, stderr=err)
        children.append(proc)
        return proc

    fastrelay = [sys.executable, "-m", "relay"]
    try:
        # moq-rs accepts only subgroup 0 with consecutive object ids: --layout single.
        pub = spawn("pub", [*fastrelay, "publish", *common, "--objects", str(OBJECTS),
                            "--group-length", str(GROUP_LENGTH), "--object-size", str(SIZE),
                            "--rate", str(RATE), "--layout", "single",
                            "--wait-subscriber", "15", "--start-delay", "1.0", "--json"])
        subs = [spawn(f"sub{i}", [*fastrelay, "subscribe", *common, "--expect-objects",
                                  str(OBJECTS), "--duration", "20", "--json"]) for i in (1, 2)]
        rs_sub = spawn("rs_sub", [sys.executable, "-m", "relay.interop.moq_rs", "subscribe",
                                  "--url", url, "--broadcast", NAMESPACE, "--track", TRACK,
                                  "--tls-fingerprint", str(fingerprint), "--expect-objects",
                                  str(OBJECTS), "--duration", "20", "--log-level", "warn"])
        deadline = time.monotonic() + 30
        for proc in [pub, *subs, rs_sub]:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for proc in children:
            stop_child(proc)

    published = _json(tmp_path / "pub.out")
    assert pub.returncode == 0, published
    assert published["objects"] == OBJECTS
    assert published["connection"]["version"] == MOQT_VERSION_DRAFT_14  # type: ignore[index]
    for name, proc in (("sub1", subs[0]), ("sub2", subs[1]), ("rs_sub", rs_sub)):
        summary = _json(tmp_path / f"{name}.out")
        assert proc.returncode == 0, (name, summary)
        assert summary["ok"] is True, summary
        assert (summary["objects"], summary["bytes"]) == (OBJECTS, OBJECTS * SIZE), summary
        assert (summary["lost"], summary["gaps"], summary["out_of_order"],
                summary["duplicates"], summary["integrity_failures"],
                summary["group_errors"]) == (0, 0, 0, 0, 0, 0), summary
        assert summary["groups_complete"] == OBJECTS // GROUP_LENGTH
        delay = summary["delay"]
        assert isinstance(delay, dict)
        assert 0 < delay["p50_us"] <= delay["p99_us"] < 1_000_000, delay
        print(f"{name}: delay p50 {delay['p50_us']} us, p99 {delay['p99_us']} us")
        if name != "rs_sub":
            # fastrelay spoke draft-14 (the only version its ALPN `moq-00` allows).
            assert summary["connection"]["version"] == MOQT_VERSION_DRAFT_14  # type: ignore


# -- several tracks on one connection, through our relay ---------------------------------------


def _relay_address(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> tuple[str, str]:
    """(moqt URL, fingerprint) from `fastrelay relay`'s first two lines."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines(keepends=True)
        if len(lines) >= 2 and lines[1].endswith("\n"):
            assert lines[0].startswith("fingerprint sha256:"), lines
            assert lines[1].startswith("listening "), lines
            return f"moqt://{lines[1].split()[1]}/relay", lines[0].strip().split(":", 1)[1]
        assert proc.poll() is None, f"relay exited with {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError(f"no listening line from the relay within {timeout} s")


def test_one_subscriber_two_tracks_through_our_relay(tmp_path: Path) -> None:
    """Two publishers (two namespaces: our relay routes a namespace to its newest publisher
    only), one `fastrelay subscribe --track NS/TRACK --track NS/TRACK` on one connection."""
    objects, group_length = 90, 15
    tracks = {"demo/cam1/video": 800, "demo/cam2/audio": 120}  # label -> object size
    children: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(tmp_path / f"{name}.out", "w") as out, \
                open(tmp_path / f"{name}.err", "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "relay", *argv], cwd=REPO,
                                    env=child_env(), stdout=out, stderr=err)
        children[name] = proc
        return proc

    def wait_text(name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in (tmp_path / f"{name}.err").read_text():
            assert children[name].poll() is None, (tmp_path / f"{name}.err").read_text()
            assert time.monotonic() < deadline, f"no {text!r} from {name} within {timeout} s"
            time.sleep(0.05)

    try:
        relay = spawn("relay", ["relay", "--listen", f"{LOOPBACK}:0", "--duration", "120"])
        url, fingerprint = _relay_address(tmp_path / "relay.out", relay, timeout=15)
        for i, (label, size) in enumerate(tracks.items()):
            namespace, _, track = label.rpartition("/")
            # --start-on-signal: both start once the subscriber has both tracks.
            spawn(f"pub{i}", ["publish", "--url", url, "--namespace", namespace, "--track", track,
                              "--fingerprint", fingerprint, "--objects", str(objects),
                              "--group-length", str(group_length), "--object-size", str(size),
                              "--rate", "300", "--layout", "single", "--wait-subscriber", "20",
                              "--start-on-signal", "--json"])
        sub = spawn("sub", ["subscribe", "--url", url, *(a for t in tracks for a in ("--track", t)),
                            "--fingerprint", fingerprint, "--expect-objects", str(objects),
                            "--duration", "30", "--json"])
        wait_text("sub", "subscribed", timeout=25)  # every track's SUBSCRIBE_OK
        for i in range(len(tracks)):
            children[f"pub{i}"].send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 40
        for name in ("pub0", "pub1", "sub"):
            children[name].wait(timeout=max(0.1, deadline - time.monotonic()))
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=10)
    finally:
        for proc in children.values():
            stop_child(proc)

    for i in range(len(tracks)):
        published = _json(tmp_path / f"pub{i}.out")
        assert children[f"pub{i}"].returncode == 0, published
        assert published["objects"] == objects, published
    summary = _json(tmp_path / "sub.out")
    assert sub.returncode == 0, summary
    assert (summary["ok"], summary["reason"], summary["objects"]) == (
        True, "complete", len(tracks) * objects), summary
    assert summary["bytes"] == objects * sum(tracks.values()), summary
    assert (summary["lost"], summary["gaps"], summary["duplicates"],
            summary["integrity_failures"]) == (0, 0, 0, 0), summary
    assert summary["delay"]["count"] == len(tracks) * objects  # type: ignore[index]
    assert summary["connection"]["track_alias"] is None  # type: ignore[index]
    per_track = summary["tracks"]
    assert isinstance(per_track, dict) and list(per_track) == list(tracks), summary
    aliases = set()
    for label, size in tracks.items():
        part = per_track[label]
        assert (part["ok"], part["reason"], part["objects"], part["bytes"]) == (
            True, "complete", objects, objects * size), (label, part)
        assert (part["lost"], part["gaps"], part["out_of_order"], part["duplicates"],
                part["integrity_failures"], part["group_errors"]) == (0, 0, 0, 0, 0, 0), part
        assert part["groups_complete"] == objects // group_length, (label, part)
        aliases.add(part["connection"]["track_alias"])
    assert None not in aliases and len(aliases) == len(tracks), per_track
    # One connection for both tracks: the relay saw three sessions in all.
    assert relay.returncode == 0, (tmp_path / "relay.err").read_text()
    stats = json.loads((tmp_path / "relay.out").read_text().splitlines()[-1][len("stats "):])
    assert stats["sessions_total"] == 3, stats


# -- the endpoints against a peer of ours, in one event loop -----------------------------------


@pytest.mark.parametrize("objects", [6, 5], ids=["full-groups", "short-last-group"])
def test_publisher_split_layout_end_of_track(certificate: tuple[Path, Path, str],
                                             objects: int) -> None:
    """The server plays the relay: SUBSCRIBE to the publisher, check streams and payloads.
    With 5 objects in groups of 3 the last group really has 2, and its payloads say so."""
    cert, key, fingerprint = certificate
    seen: dict[str, object] = {"streams": [], "objects": [], "done": None, "ns": None}
    verifier = TrackVerifier()

    def on_event(protocol, event) -> None:  # type: ignore[no-untyped-def]
        s = protocol.session
        if isinstance(event, NamespacePublished):
            seen["ns"] = event.namespace
            s.accept_publish_namespace(event.request_id)
            s.subscribe(event.namespace, b"video")
        elif isinstance(event, SubgroupStreamOpened):
            h = event.header
            seen["streams"].append((h.group_id, h.subgroup_id, h.publisher_priority,  # type: ignore[union-attr]
                                    h.end_of_group))  # type: ignore[union-attr]
        elif isinstance(event, ObjectReceived):
            if event.header.status == ObjectStatus.NORMAL:
                verifier.on_object(event.header.group_id, event.payload, time.time_ns())
                assert event.header.extensions[:1] == b"\x10"  # the timestamp extension
            seen["objects"].append((event.header.group_id, event.header.object_id,
                                    event.header.status))
        elif isinstance(event, PublishDoneReceived):
            seen["done"] = (event.status_code, event.stream_count)

    async def scenario() -> PublishSummary:
        server = await serve(LOOPBACK, 0, cert, key, lambda p: None, on_event=on_event)
        try:
            _, port = server_address(server)
            opts = PublisherOptions(
                url=f"moqt://{LOOPBACK}:{port}/p", namespace=(b"demo", b"cam"), track=b"video",
                tls=TlsOptions(fingerprint=fingerprint), rate=0, object_size=100,
                group_length=3, objects=objects, wait_subscriber=5)
            return await run_publisher(opts)
        finally:
            server.close()

    summary = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert summary.ok and summary.objects == objects and summary.groups == 2, summary
    assert seen["ns"] == (b"demo", b"cam")
    # Per group: subgroup 0 (priority 0) with the first object, subgroup 1 (priority 128,
    # end of group) with the rest; then the END_OF_TRACK group.
    assert seen["streams"] == [(0, 0, 0, False), (0, 1, 128, True), (1, 0, 0, False),
                               (1, 1, 128, True), (2, 0, 0, True)]
    assert seen["objects"][-1] == (2, 0, ObjectStatus.END_OF_TRACK)
    assert seen["done"] == (PublishDoneStatusCode.TRACK_ENDED, 5)
    result = verifier.summary(expect_objects=objects, expect_groups=2, track_ended=True,
                              reason="x")
    assert result.ok and result.lost == 0 and result.groups_complete == 2, result


def test_subscriber_tells_skipped_from_lost(certificate: tuple[Path, Path, str]) -> None:
    """The server plays a relay that skips subgroup 1 of group 1 (reset with the skip code)
    and loses object 2 of group 2 (no signal)."""
    cert, key, fingerprint = certificate

    def payload(group: int, obj: int) -> bytes:
        return encode_object(PayloadHeader(group=group, object=obj, objects_in_group=3,
                                           size=64, send_ns=time.time_ns()))

    def on_event(protocol, event) -> None:  # type: ignore[no-untyped-def]
        s = protocol.session
        if isinstance(event, SubscribeRequested):
            rid = event.request_id
            s.accept_subscribe(rid, 1)
            for group in range(3):
                first = s.open_subgroup(rid, group, 0, 0)
                first.write(0, payload(group, 0), end_stream=True)
                rest = s.open_subgroup(rid, group, 1, 128, end_of_group=True)
                if group == 1:
                    rest.skip()
                    continue
                rest.write(1, payload(group, 1), end_stream=group == 2)
                if group != 2:
                    rest.write(2, payload(group, 2), end_stream=True)
            s.publish_done(rid, PublishDoneStatusCode.TRACK_ENDED)

    async def scenario() -> SubscribeSummary:
        server = await serve(LOOPBACK, 0, cert, key, lambda p: None, on_event=on_event)
        try:
            _, port = server_address(server)
            return await run_subscriber(SubscriberOptions(
                url=f"moqt://{LOOPBACK}:{port}/s", namespace=(b"demo",), track=b"t",
                tls=TlsOptions(fingerprint=fingerprint), duration=5))
        finally:
            server.close()

    summary = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert (summary.objects, summary.skipped, summary.skipped_subgroups, summary.lost) == (
        6, 2, 1, 1), summary
    assert summary.track_ended and summary.reason == "track_ended"
    assert summary.ok is False


def _wait_signal_handler(proc: subprocess.Popen[bytes], signum: int, timeout: float) -> None:
    """Until `proc` catches `signum` (its SigCgt mask in /proc), so the signal is not fatal."""
    deadline = time.monotonic() + timeout
    while True:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(line for line in status.splitlines()
                          if line.startswith("SigCgt:")).split()[1], 16)
        if caught >> (signum - 1) & 1:
            return
        assert proc.poll() is None, f"{proc.args!r} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"no handler for signal {signum} in {timeout} s"
        time.sleep(0.05)


def test_subscriber_exits_cleanly_on_sigterm(moq_rs_relay: dict[str, object],
                                             tmp_path: Path) -> None:
    url = f"moqt://{moq_rs_relay['bind']}/x"
    with open(tmp_path / "sub.out", "w") as out, open(tmp_path / "sub.err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "subscribe", "--url", url, "--namespace", "none/here",
             "--track", "t", "--insecure", "--duration", "30", "--json"],
            cwd=REPO, env=child_env(), stdout=out, stderr=err)
    try:
        # Python's start-up alone can take 1.5 s on a loaded machine: wait for the handler.
        _wait_signal_handler(proc, signal.SIGTERM, timeout=15)
        time.sleep(0.5)  # connected and retrying a SUBSCRIBE for a track nobody announced
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        stop_child(proc)
    summary = _json(tmp_path / "sub.out")
    assert (proc.returncode, summary["reason"], summary["objects"]) == (1, "signal", 0)


# -- command line ------------------------------------------------------------------------------


def test_cli_bad_url_and_tls_options(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--namespace", "a/b", "--track", "t"]
    run_cli(["publish", "--url", "https://x/y", *base], capsys, exit_code=1,
            stderr=r"^error: 'https://x/y' is not a moqt://host:port/path URL\n$")
    run_cli(["subscribe", "--url", "moqt://x:1/y", *base, "--insecure", "--fingerprint", "ab"],
            capsys, exit_code=1,
            stderr=r"^error: --insecure cannot be combined with --fingerprint or --cafile\n$")
    run_cli(["publish", "--url", "moqt://x:1/y", *base, "--layout", "zigzag"], capsys,
            exit_code=2)
    run_cli(["subscribe", "--url", "moqt://x:1/y", "--namespace", "/", "--track", "t"], capsys,
            exit_code=1, stderr=r"error: --namespace '/': A track namespace needs")
    run_cli(["subscribe", "--url", "moqt://x:1/y", "--track", "video"], capsys, exit_code=1,
            stderr=r"^error: --track 'video': without --namespace, give each track as "
                   r"NAMESPACE/TRACK \(e\.g\. live/cam1/video\)\n$")
    run_cli(["subscribe", "--url", "moqt://x:1/y", "--namespace", "a", "--track", "v",
             "--track", "v"], capsys, exit_code=1, stderr=r"^error: --track 'v' is given twice\n$")
    run_cli(["subscribe", "--url", "moqt://x:1/y", "--namespace", "a"], capsys, exit_code=2)


def test_cli_no_server_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(["subscribe", "--url", f"moqt://{LOOPBACK}:9/x", "--namespace", "a",
                      "--track", "t", "--insecure", "--connect-timeout", "0.5"], capsys,
                     exit_code=1)
    assert result.stderr == (f"error: no MoQ session with moqt://{LOOPBACK}:9/x within 0.5 s; "
                             "is the server up?\n")
    assert result.stdout == ""
