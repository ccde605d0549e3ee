"""`fastrelay relay`: one-line errors for bad input, clean exit on --duration and SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.moqt.quic import generate_certificate
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent


def test_bad_listen_and_upstream(capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(["relay", "--listen", "nope"], capsys, exit_code=1,
            stderr=r"^error: --listen 'nope': expected HOST:PORT")
    run_cli(["relay", "--listen", "127.0.0.1:0", "--upstream", "https://x/y"], capsys,
            exit_code=1,
            stderr=r"^error: --upstream: 'https://x/y' is not a moqt://host:port/path URL\n$")


def test_fastpath_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # `on` refuses (one line, before anything is set up) where the fast path cannot run
    run_cli(["relay", "--listen", "0.0.0.0:0", "--fastpath", "on"], capsys, exit_code=1,
            stderr=r"^error: --fastpath on: standard QUIC is protected in userspace; "
                   r"the fast path needs --crypto none.*\n$")
    run_cli(["relay", "--listen", "127.0.0.1:0", "--fastpath", "on", "--crypto", "none"],
            capsys, exit_code=1, stderr=r"^error: --fastpath on: listening on 127.0.0.1 "
                                       r"\(loopback\)")
    run_cli(["relay", "--listen", "127.0.0.1:0", "--fastpath", "off", "--interface", "eth0"],
            capsys, exit_code=1,
            stderr=r"^error: --interface, --fastpath-capacity and --userspace-peer go with "
                   r"--fastpath on or auto\n$")
    run_cli(["relay", "--listen", "127.0.0.1:0", "--fastpath", "off", "--userspace-peer",
             "10.0.0.2"], capsys, exit_code=1, stderr=r"--userspace-peer go with --fastpath on")
    run_cli(["relay", "--listen", "0.0.0.0:0", "--userspace-peer", "sub1"], capsys,
            exit_code=1, stderr=r"^error: --userspace-peer sub1: not an IP address\n$")
    run_cli(["relay", "--listen", "0.0.0.0:0", "--fastpath-capacity", "max_bananas=3"], capsys,
            exit_code=1, stderr=r"^error: --fastpath-capacity 'max_bananas=3': expected NAME=VALUE "
                                r"with NAME one of max_subscribers_per_upstream, ")
    run_cli(["relay", "--listen", "0.0.0.0:0", "--fastpath-capacity", "max_subscribers=0"],
            capsys, exit_code=1, stderr=r"must be a positive integer\n$")
    run_cli(["relay", "--listen", "127.0.0.1:0", "--fastpath", "sometimes"], capsys,
            exit_code=2, stderr=r"--fastpath")


def test_missing_cert_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    result = run_cli(["relay", "--listen", "127.0.0.1:0", "--cert", str(tmp_path / "c.pem"),
                      "--key", str(tmp_path / "k.pem")], capsys, exit_code=1)
    assert result.stderr == f"error: --cert {tmp_path / 'c.pem'}: no such file\n"
    run_cli(["relay", "--listen", "127.0.0.1:0", "--cert", str(tmp_path / "c.pem")], capsys,
            exit_code=1, stderr=r"^error: --cert and --key go together\n$")


def test_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        result = run_cli(["relay", "--listen", f"127.0.0.1:{port}"], capsys, exit_code=1)
    assert result.stderr == f"error: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert result.stdout.startswith("fingerprint sha256:")


def test_given_certificate_and_duration(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    cert, key, fingerprint = generate_certificate(["localhost", "127.0.0.1"])
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    result = run_cli(["relay", "--listen", "127.0.0.1:0", "--cert", str(tmp_path / "c.pem"),
                      "--key", str(tmp_path / "k.pem"), "--duration", "0.2"], capsys)
    lines = result.stdout.splitlines()
    assert lines[0] == f"fingerprint sha256:{fingerprint}"
    assert lines[1].startswith("listening 127.0.0.1:")
    # nothing to attach to on loopback: auto says so and stays in userspace
    assert lines[2].startswith("fastpath off: listening on 127.0.0.1 (loopback)")
    assert lines[3].startswith("stats {")


def test_sigterm_is_a_clean_exit(tmp_path: Path) -> None:
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "relay", "relay", "--listen",
                                 "127.0.0.1:0"], cwd=REPO, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 15
        while "listening" not in (tmp_path / "out").read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, (tmp_path / "err").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    assert (tmp_path / "out").read_text().splitlines()[-1].startswith("stats {")
