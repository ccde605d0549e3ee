"""`--crypto=none` end to end over real UDP: the payload is in clear on the wire only when both
sides negotiated it, and a peer without the transport parameter gets a clear error."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from crypto_backends import NoneBackend, get_backend
from relay.moqt.quic import TlsOptions, connect, serve, server_address
from relay.moqt.session import ObjectReceived, SubscribeAccepted, SubscribeRequested
from tests.conftest import run_cli
from tests.test_publish_subscribe import LOOPBACK, certificate, moq_rs_relay  # noqa: F401 (fixtures)

MARKER = b"fastrelay-cleartext-marker-" * 8


class RecordingProxy(asyncio.DatagramProtocol):
    """A UDP hop on loopback that forwards both ways and keeps every datagram: the capture."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client: tuple[str, int] | None = None
        self.wire: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.wire.append(data)
        if addr == self.server:
            if self.client is not None:
                self.transport.sendto(data, self.client)
        else:
            self.client = addr
            self.transport.sendto(data, self.server)


def exchange_object(cert: Path, key: Path, backend: NoneBackend | None) -> tuple[bytes, list[bytes]]:
    """One object publisher-side server -> subscriber client through the proxy."""

    async def scenario() -> tuple[bytes, list[bytes]]:
        def on_event(protocol, event) -> None:  # type: ignore[no-untyped-def]
            if isinstance(event, SubscribeRequested):
                protocol.session.accept_subscribe(event.request_id, 1)
                protocol.session.open_subgroup(event.request_id, 0, 0, 0).write(
                    0, MARKER, end_stream=True)
                protocol.flush()

        server = await serve(LOOPBACK, 0, cert, key, lambda p: None, on_event=on_event,
                             crypto=backend)
        loop = asyncio.get_running_loop()
        proxy_transport, proxy = await loop.create_datagram_endpoint(
            lambda: RecordingProxy(server_address(server)), local_addr=(LOOPBACK, 0))
        try:
            port = proxy_transport.get_extra_info("sockname")[1]
            async with connect(f"moqt://{LOOPBACK}:{port}/t", tls=TlsOptions(insecure=True),
                               crypto=backend) as client:
                client.session.subscribe((b"ns",), b"t")
                client.flush()
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    event = await client.next_event(timeout=1)
                    if isinstance(event, SubscribeAccepted):
                        continue
                    if isinstance(event, ObjectReceived):
                        return event.payload, proxy.wire
                raise AssertionError("no object within 5 s")
        finally:
            proxy_transport.close()
            server.close()

    return asyncio.run(asyncio.wait_for(scenario(), 15))


def test_none_puts_the_payload_on_the_wire_in_clear(certificate) -> None:  # noqa: F811
    cert, key, _ = certificate
    payload, wire = exchange_object(cert, key, NoneBackend())
    assert payload == MARKER
    assert any(MARKER in datagram for datagram in wire)


def test_without_crypto_the_payload_is_encrypted(certificate) -> None:  # noqa: F811
    cert, key, _ = certificate
    payload, wire = exchange_object(cert, key, None)
    assert payload == MARKER
    assert wire and not any(MARKER[:16] in datagram for datagram in wire)


def test_none_against_moq_rs_is_a_clear_one_line_error(
        moq_rs_relay: dict[str, object], capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    # moq-rs (quinn) does not implement draft-banks-quic-disable-encryption.
    result = run_cli(["publish", "--url", f"moqt://{moq_rs_relay['bind']}/x", "--namespace", "a",
                      "--track", "t", "--insecure", "--crypto", "none", "--objects", "1"],
                     capsys, exit_code=1)
    assert result.stderr.count("\n") == 1
    assert "TRANSPORT_PARAMETER_ERROR" in result.stderr
    assert "disable_1rtt_encryption (0xBAAD" in result.stderr


@pytest.mark.root  # the probe behind the refusal needs root
def test_unusable_backend_refused_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--url", f"moqt://{LOOPBACK}:9/x", "--namespace", "a", "--track", "t"]
    run_cli(["subscribe", *base, "--crypto", "nic"], capsys, exit_code=1,
            stderr=r"^error: crypto backend 'nic' cannot run here: no NIC with crypto offload")
    run_cli(["publish", *base, "--crypto", "rot13"], capsys, exit_code=1,
            stderr=r"^error: unknown crypto backend 'rot13'; valid backends: none, soft, nic\n$")


@pytest.mark.root  # the probe behind the refusal needs root
def test_relay_shorthand_refuses_an_unusable_backend_before_setting_up(
        capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(["--crypto=nic", "--listen", f"{LOOPBACK}:0", "--duration", "1"], capsys,
                     exit_code=1, stderr=r"^error: crypto backend 'nic' cannot run here: ")
    assert result.stdout == ""  # no certificate, no socket: nothing was set up
    assert result.stderr.count("\n") == 1


def test_none_needs_nothing_from_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Endpoints with --crypto none never run the probe (it compiles eBPF proofs)."""
    import offload.probe

    def no_probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("the probe ran")

    monkeypatch.setattr(offload.probe, "run_probe", no_probe)
    get_backend("none").check()


def test_standard_peer_of_a_none_relay_gets_a_clear_error_and_the_relay_counts_it(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`fastrelay --crypto=none` (the shorthand) against a subscriber speaking standard QUIC:
    the subscriber's user reads why in one line; the relay's operator sees a QUIC
    TRANSPORT_PARAMETER_ERROR in its counters, not a MoQ code with the same number."""
    import json
    import re
    import subprocess
    import sys

    from tests.children import child_env, stop_child

    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        relay = subprocess.Popen([sys.executable, "-m", "relay", "--crypto=none", "--listen",
                                  f"{LOOPBACK}:0"], stdout=out, stderr=err, env=child_env())
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"^listening \S+:(\d+)$", (tmp_path / "out").read_text(), re.M)):
            assert relay.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()
            time.sleep(0.05)
        result = run_cli(["subscribe", "--url", f"moqt://{LOOPBACK}:{found.group(1)}/x",
                          "--namespace", "a", "--track", "t", "--insecure", "--duration", "10"],
                         capsys, exit_code=1)
        assert result.stderr.count("\n") == 1
        assert "TRANSPORT_PARAMETER_ERROR: --crypto=none requires the peer to send " \
               "disable_1rtt_encryption (0xBAAD" in result.stderr, result.stderr
    finally:
        stop_child(relay)
    stats = json.loads((tmp_path / "out").read_text().splitlines()[-1].removeprefix("stats "))
    assert stats["crypto"] == {"backend": "none"}
    assert stats["sessions_failed"] == {"QUIC TRANSPORT_PARAMETER_ERROR": 1}, stats
