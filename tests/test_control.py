"""The relay's control socket (relay/control.py) and `fastrelay stats`.

Servers run in a real asyncio loop: inside the test (asyncio.run) when the test talks to
them asynchronously, or in a background thread when the blocking client or the CLI asks.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from relay import control
from relay.cli.stats_cmd import flatten
from relay.control import ControlServer, RelayRecord
from relay.errors import FastrelayError
from tests.children import child_env, stop_child
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent
STATS = {"sessions": 2, "counters": {"objects_in": 7, "skipped": {}}, "namespaces": ["a/b"]}


@pytest.fixture
def relays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty relays directory that the CLI and the default paths use."""
    directory = tmp_path / "relays"
    monkeypatch.setenv(control.RELAYS_DIR_ENV, str(directory))
    return directory


@contextmanager
def serving(stats: Callable[[], dict[str, Any]], directory: Path,
            pid: int | None = None) -> Iterator[ControlServer]:
    """A control server in its own loop on a background thread, stopped on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = ControlServer(stats, listen="127.0.0.1:4443", directory=directory, pid=pid)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=10)
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def dead_pid() -> int:
    """The pid of a child that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def stale_socket(path: Path) -> None:
    """A socket file nobody listens on (what a killed relay leaves)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


# --- server and client ----------------------------------------------------------------------

def test_round_trip_in_a_real_loop(relays: Path) -> None:
    async def main() -> None:
        server = ControlServer(lambda: STATS, listen="127.0.0.1:4443", directory=relays)
        await server.start()
        try:
            assert control.current_registry() is server.registry
            assert stat.S_IMODE(relays.stat().st_mode) == 0o700
            sock = control.socket_path(os.getpid(), relays)
            reply = await asyncio.to_thread(control.query, sock, "stats", 5.0)
            assert reply["ok"] is True
            assert reply["stats"] == STATS
            assert reply["pid"] == os.getpid()
            assert reply["listen"] == "127.0.0.1:4443"
            assert reply["control"] == {"requests": 1, "errors": 0}
            record = json.loads(control.record_path(os.getpid(), relays).read_text())
            assert record["pid"] == os.getpid() and record["interfaces"] == []
            assert [r.pid for r in control.running_relays(relays)] == [os.getpid()]
        finally:
            await server.stop()
        assert control.current_registry() is None
        assert list(relays.iterdir()) == []

    asyncio.run(main())


def test_malformed_and_unknown_requests_are_counted_and_answered(relays: Path) -> None:
    async def main() -> None:
        server = ControlServer(lambda: STATS, directory=relays)
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(
                str(control.socket_path(os.getpid(), relays)))
            for line in (b"not json\n", b"[1, 2]\n", b'{"cmd": "reboot"}\n', b'{"cmd": "stats"}\n'):
                writer.write(line)
            await writer.drain()
            replies = [json.loads(await asyncio.wait_for(reader.readline(), 5)) for _ in range(4)]
            assert replies[0] == {"ok": False, "error": "malformed request: expected one JSON "
                                                        "object per line"}
            assert replies[1] == {"ok": False, "error": 'malformed request: expected {"cmd": "..."}'}
            assert replies[2] == {"ok": False, "error": "unknown command 'reboot' (known: stats, "
                                                        "info)"}
            assert replies[3]["ok"] is True and replies[3]["control"] == {"requests": 4, "errors": 3}
            # A line longer than the limit: answered, connection closed, server still serving.
            writer.write(b"x" * (control.MAX_REQUEST * 2) + b"\n")
            await writer.drain()
            too_long = json.loads(await asyncio.wait_for(reader.readline(), 5))
            assert too_long == {"ok": False, "error": "malformed request: longer than "
                                                      f"{control.MAX_REQUEST} bytes"}
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            reply = await asyncio.to_thread(control.query, server.socket_path, "info", 5.0)
            assert reply["control"] == {"requests": 6, "errors": 4}
        finally:
            await server.stop()

    asyncio.run(main())


def test_a_failing_stats_provider_is_an_error_reply(relays: Path) -> None:
    def broken() -> dict[str, Any]:
        raise KeyError("tracks")

    with serving(broken, relays) as server:
        with pytest.raises(FastrelayError) as err:
            control.query(server.socket_path, "stats", 5.0)
    assert str(err.value) == (f"the relay on {server.socket_path} refused 'stats': stats failed: "
                              "KeyError: 'tracks'")


def test_stale_socket_of_a_dead_pid(relays: Path) -> None:
    pid = dead_pid()
    path = control.socket_path(pid, relays)
    stale_socket(path)
    with pytest.raises(FastrelayError) as err:
        control.query(path, "stats", 1.0)
    assert str(err.value) == (f"relay {pid} is not running (stale control socket {path}); "
                              "run 'fastrelay cleanup' as root")


def test_no_socket_and_no_answer(relays: Path) -> None:
    with pytest.raises(FastrelayError) as err:
        control.query(relays / "123.sock", "stats", 1.0)
    assert str(err.value) == f"no running fastrelay relay (no control socket {relays / '123.sock'})"
    # Our own pid is alive; the socket accepts (backlog) but nobody ever answers.
    path = control.socket_path(os.getpid(), relays)
    relays.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen(1)
        started = time.monotonic()
        with pytest.raises(FastrelayError) as err:
            control.query(path, "stats", 0.3)
        assert time.monotonic() - started < 5
    assert str(err.value) == f"the relay on {path} did not answer within 0.3 s"


def test_registry_records_attachments(relays: Path) -> None:
    with serving(lambda: {}, relays) as server:
        registry = control.current_registry()
        assert registry is server.registry
        registry.register_attachment(5, "fr-x", "ffff:fff2", 30, ":1", "fastpath_ingress")
        registry.register_attachment(5, "fr-x", "ffff:fff3", 10, ":1", "fastpath_egress")
        registry.register_attachment(5, "fr-x", "ffff:fff2", 30, ":1", "fastpath_ingress")
        record = RelayRecord.load(server.record.path)
        assert [(a.parent, a.prio, a.program) for a in record.interfaces] == [
            ("ffff:fff3", 10, "fastpath_egress"), ("ffff:fff2", 30, "fastpath_ingress")]
        registry.unregister_attachment(5, "fr-x", "ffff:fff3", 10, ":1")
        record = RelayRecord.load(server.record.path)
        assert [a.program for a in record.interfaces] == ["fastpath_ingress"]
        assert record.listen == "127.0.0.1:4443" and record.alive()
    assert control.current_registry() is None
    assert not server.record.path.exists()


def test_unusable_directory_warns_and_the_relay_runs_on(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")

    async def main() -> ControlServer:
        server = ControlServer(lambda: {}, directory=blocker / "relays")
        await server.start()
        await server.stop()
        return server

    server = asyncio.run(main())
    assert server.unavailable is not None
    assert control.current_registry() is None
    err = capsys.readouterr().err
    assert err.startswith(f"warning: no control socket ({blocker / 'relays' / str(os.getpid())}"
                          ".sock: ") and err.count("\n") == 1


def test_record_of_a_reused_pid_is_not_alive() -> None:
    ticks = control.process_start_ticks(os.getpid())
    assert ticks is not None
    assert control.pid_alive(os.getpid(), ticks)
    assert not control.pid_alive(os.getpid(), ticks + 1)
    assert not control.pid_alive(dead_pid())


# --- fastrelay stats -----------------------------------------------------------------------

def test_flatten_nested_and_fastpath_rows() -> None:
    rows = dict(flatten({"sessions": 0, "counters": {"objects_in": 3, "refusals": {}},
                         "upstream": None, "namespaces": ["a", "b"],
                         "punts": {"no_subscriber": {"packets": 3, "bytes": 120}}}))
    assert rows == {"sessions": "0", "counters.objects_in": "3", "counters.refusals": "none",
                    "upstream": "-", "namespaces": "a, b",
                    "punts.no_subscriber": "3 packets, 120 bytes"}


def test_stats_no_relay(relays: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(["stats"], capsys, exit_code=1,
            stderr=rf"^error: no running fastrelay relay \(no live relay's control socket in "
                   rf"{relays}\)\n$")
    run_cli(["stats", "--pid", "999999999"], capsys, exit_code=1,
            stderr=r"^error: no running fastrelay relay with pid 999999999 \(no control socket ")


def test_stats_stale_socket(relays: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pid = dead_pid()
    stale_socket(control.socket_path(pid, relays))
    run_cli(["stats", "--pid", str(pid)], capsys, exit_code=1,
            stderr=rf"^error: relay {pid} is not running \(stale control socket .*; run "
                   r"'fastrelay cleanup' as root\n$")
    # The lister does not count it as a relay; with its record left, it says what to run.
    run_cli(["stats"], capsys, exit_code=1, stderr=r"^error: no running fastrelay relay ")
    RelayRecord(pid=pid, started="", listen="", path=control.record_path(pid, relays)).write()
    run_cli(["stats"], capsys, exit_code=1,
            stderr=rf"^error: no running fastrelay relay \(no live relay's control socket in "
                   rf"{relays}; {pid} died without cleaning up: run 'fastrelay cleanup' as "
                   r"root\)\n$")


def test_stats_several_relays_need_pid(relays: Path, capsys: pytest.CaptureFixture[str]) -> None:
    relays.mkdir()
    for pid in sorted({os.getpid(), os.getppid()}):
        RelayRecord(pid=pid, started="", listen="", path=control.record_path(pid, relays)).write()
        stale_socket(control.socket_path(pid, relays))
    pids = ", ".join(str(p) for p in sorted({os.getpid(), os.getppid()}))
    run_cli(["stats"], capsys, exit_code=1,
            stderr=rf"^error: 2 fastrelay relays are running \(pids {pids}\); choose one with "
                   r"--pid\n$")


def test_stats_table_shows_a_fastpath_section(relays: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    stats = {**STATS, "fastpath": {"enabled": True,
                                   "punts": {"no_subscriber": {"packets": 4, "bytes": 400}},
                                   "drops": {"bad_header": {"packets": 1, "bytes": 60}}}}
    with serving(lambda: stats, relays):
        out = run_cli(["stats"], capsys).stdout
        assert json.loads(run_cli(["stats", "--json"], capsys).stdout)["stats"] == stats
    for text in ("Relay", "Counters", "Fast path", "counters.objects_in", "namespaces",
                 "punts.no_subscriber", "4 packets, 400 bytes", "drops.bad_header"):
        assert text in out, out
    assert out.index("Fast path") > out.index("counters.objects_in")


def test_stats_against_a_real_relay(relays: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    env = child_env()
    env[control.RELAYS_DIR_ENV] = str(relays)
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "relay", "relay", "--listen",
                                 "127.0.0.1:0"], cwd=REPO, stdout=out, stderr=err, env=env)
    sock = control.socket_path(proc.pid, relays)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, (tmp_path / "err").read_text()
            assert time.monotonic() < deadline, "the relay made no control socket"
            time.sleep(0.05)
        listening = next(line for line in (tmp_path / "out").read_text().splitlines()
                         if line.startswith("listening "))
        reply = json.loads(run_cli(["stats", "--json"], capsys).stdout)
        assert reply["pid"] == proc.pid
        assert listening == f"listening {reply['listen']}"
        assert reply["stats"]["sessions"] == 0
        assert reply["stats"]["sessions_total"] == 0
        assert reply["stats"]["counters"]["objects_in"] == 0
        table = run_cli(["stats", "--pid", str(proc.pid)], capsys).stdout
        assert "sessions_total" in table and "counters.objects_in" in table
        assert json.loads(run_cli(["stats", "--socket", str(sock), "--json"],
                                  capsys).stdout)["control"]["requests"] == 3
        proc.terminate()
        assert proc.wait(timeout=10) == 0, (tmp_path / "err").read_text()
    finally:
        stop_child(proc)
    assert not sock.exists() and not control.record_path(proc.pid, relays).exists()
    run_cli(["stats"], capsys, exit_code=1, stderr=r"^error: no running fastrelay relay ")
