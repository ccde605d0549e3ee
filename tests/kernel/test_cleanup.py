"""`fastrelay cleanup` removes what a killed relay left in the kernel, and nothing else.

Each test makes its own uniquely named network namespace with a veth pair and removes it
in a finalizer. The fast-path programs are real (relay.fastpath.loader.FastPath); a
"killed relay" is a child process that attached them, then got SIGKILL.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hw.lab import LOSS_FILTER_PRIO, LOSS_FUNCTION, _attach_loss_filter, _LossProgram
from relay import control
from relay.cli.cleanup_cmd import HOOKS, tc_handle
from relay.control import Attachment, RelayRecord
from relay.fastpath.loader import (
    FASTPATH_EGRESS_PRIO,
    FASTPATH_INGRESS_PRIO,
    FILTER_HANDLE,
    TC_EGRESS,
    TC_INGRESS,
    FastPath,
)
from tests.children import child_env, stop_child
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[2]
NETNS_DIR = Path("/run/netns")
# Not "fr-": that prefix is the lab's, and `lab down` sweeps it.
NS_PREFIX = "frclean-"
VETH_A, VETH_B = "cl0", "cl1"
ATTACH_TIMEOUT = 120.0   # the child compiles the fast path (seconds)

# A relay stand-in: the fast path attached to one interface, then nothing until it is
# killed. mode: "record" starts the control server (its registry) first, so the loader
# records each filter; "adopt" attaches first, as the relay does, and the control server
# finds the filters this process holds when it starts; "none" has no control server.
KILLED_RELAY = """
import asyncio, sys
from relay.control import ControlServer
from relay.fastpath.loader import FastPath

async def main(ns, ifindex, mode):
    if mode == "record":
        await ControlServer(lambda: {}, listen="test").start()
    fp = FastPath()
    # pyroute2's synchronous IPRoute runs its own loop: not inside this one.
    await asyncio.to_thread(fp.attach, ifindex, netns=ns or None)
    if mode == "adopt":
        await ControlServer(lambda: {}, listen="test").start()
    print("attached", flush=True)
    await asyncio.sleep(600)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""

@dataclass
class Namespace:
    name: str
    ifindex: dict[str, int]


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    from pyroute2 import IPRoute, netns

    name = f"{NS_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        with IPRoute(netns=name, flags=0) as ipr:
            ipr.link("add", ifname=VETH_A, kind="veth", peer=VETH_B)
            index = {n: ipr.link_lookup(ifname=n)[0] for n in (VETH_A, VETH_B)}
            for i in index.values():
                ipr.link("set", index=i, state="up")
        yield Namespace(name, index)
    finally:
        if (NETNS_DIR / name).exists():
            netns.remove(name)
    assert not (NETNS_DIR / name).exists()


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    relays, pins = tmp_path / "relays", tmp_path / "pins"
    monkeypatch.setenv(control.RELAYS_DIR_ENV, str(relays))
    monkeypatch.setenv(control.PINS_DIR_ENV, str(pins))
    return relays, pins


def our_filters(ns: str, ifindex: int) -> set[tuple[str, int, str]]:
    """(hook, prio, program name) of every bpf filter on the interface's clsact hooks."""
    from pyroute2 import IPRoute

    found = set()
    with IPRoute(netns=ns, flags=0) as ipr:
        for parent, hook in HOOKS.items():
            for f in ipr.get_filters(index=ifindex, parent=tc_handle(parent)):
                options = f.get_attr("TCA_OPTIONS")
                if f.get_attr("TCA_KIND") == "bpf" and f["handle"] and options is not None:
                    found.add((hook, f["info"] >> 16, options.get_attr("TCA_BPF_NAME")))
    return found


ATTACHED = {("ingress", FASTPATH_INGRESS_PRIO, "fastpath_ingress"),
            ("egress", FASTPATH_EGRESS_PRIO, "fastpath_egress")}


def killed_relay(ns: Namespace, ifname: str, *, mode: str, inside: bool = False) -> int:
    """Run a relay stand-in that attaches the fast path to ifname, SIGKILL it once it has;
    returns its (now dead, reaped) pid. inside: the relay runs in the namespace itself (its
    record then names no namespace), else it reaches in by name."""
    argv = [sys.executable, "-c", KILLED_RELAY, "" if inside else ns.name,
            str(ns.ifindex[ifname]), mode]
    if inside:
        argv = ["ip", "netns", "exec", ns.name, *argv]
    proc = subprocess.Popen(argv, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + ATTACH_TIMEOUT
        ready, _, _ = select.select([proc.stdout], [], [], ATTACH_TIMEOUT)
        line = proc.stdout.readline() if ready else ""
        assert line == "attached\n", (line, proc.poll(),
                                      proc.stderr.read() if proc.poll() is not None else "")
        assert time.monotonic() < deadline
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        stop_child(proc)
    assert proc.returncode == -signal.SIGKILL
    assert our_filters(ns.name, ns.ifindex[ifname]) == ATTACHED
    return proc.pid


def killed_pid() -> int:
    """The pid of a child that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def rows_for(rows: list[dict[str, str]], ns: str) -> list[tuple[str, str]]:
    return sorted((r["action"], r["what"]) for r in rows if f"netns {ns}," in r["where"])


@pytest.mark.root
def test_dead_relays_filters_and_files_go_live_ones_stay(
        namespace: Namespace, dirs: tuple[Path, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    relays, pins = dirs
    dead = killed_relay(namespace, VETH_A, mode="record")
    record = RelayRecord.load(control.record_path(dead, relays))
    assert {(a.netns, a.ifindex, a.program) for a in record.interfaces} == {
        (namespace.name, namespace.ifindex[VETH_A], "fastpath_ingress"),
        (namespace.name, namespace.ifindex[VETH_A], "fastpath_egress")}
    assert control.socket_path(dead, relays).exists()   # stale: SIGKILL left it

    # A live relay (this process) with the fast path on the other end, and its record.
    fp = FastPath()
    try:
        fp.attach(namespace.ifindex[VETH_B], netns=namespace.name)
        live = RelayRecord(pid=os.getpid(), started="now", listen="test",
                           start_ticks=control.process_start_ticks(os.getpid()),
                           path=control.record_path(os.getpid(), relays),
                           interfaces=[Attachment(namespace.ifindex[VETH_B], namespace.name,
                                                  parent, prio, FILTER_HANDLE)
                                       for parent, prio in ((TC_INGRESS, FASTPATH_INGRESS_PRIO),
                                                            (TC_EGRESS, FASTPATH_EGRESS_PRIO))])
        live.write()
        # A dead pid's record that names the live filters: their program is held, so kept.
        other_dead = killed_pid()
        RelayRecord(pid=other_dead, started="then", listen="test",
                    path=control.record_path(other_dead, relays),
                    interfaces=live.interfaces).write()
        (pins / str(dead)).mkdir(parents=True)
        (pins / str(dead) / "fr_subs").write_text("")
        (pins / str(os.getpid())).mkdir()

        dry = json.loads(run_cli(["cleanup", "--json", "--dry-run"], capsys).stdout)
        assert ("would remove", "tc filter fastpath_ingress") in rows_for(dry, namespace.name)
        assert our_filters(namespace.name, namespace.ifindex[VETH_A]) == ATTACHED

        rows = json.loads(run_cli(["cleanup", "--json"], capsys).stdout)
        assert rows_for(rows, namespace.name) == [
            ("kept", "tc filter fastpath_egress"), ("kept", "tc filter fastpath_ingress"),
            ("removed", "tc filter fastpath_egress"), ("removed", "tc filter fastpath_ingress")]
        kept = [r for r in rows if r["action"] == "kept"]
        assert all(f"live process {os.getpid()} holds its program" in r["detail"] for r in kept)
        removed_files = {r["where"] for r in rows if r["what"] == "file"}
        assert removed_files == {str(control.record_path(dead, relays)),
                                 str(control.socket_path(dead, relays)),
                                 str(control.record_path(other_dead, relays))}
        assert [r["where"] for r in rows if r["what"] == "bpf pin"] == [str(pins / str(dead))]

        assert our_filters(namespace.name, namespace.ifindex[VETH_A]) == set()
        assert our_filters(namespace.name, namespace.ifindex[VETH_B]) == ATTACHED
        assert sorted(p.name for p in relays.iterdir()) == [f"{os.getpid()}.json"]
        assert sorted(p.name for p in pins.iterdir()) == [str(os.getpid())]
    finally:
        fp.close()
    assert our_filters(namespace.name, namespace.ifindex[VETH_B]) == set()


@pytest.mark.root
def test_relay_that_ran_inside_a_namespace(namespace: Namespace, dirs: tuple[Path, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """It attached before its control server started (the control server adopted the
    filters it holds), in its own namespace: the record says netns None plus that
    namespace's inode, and cleanup run from elsewhere finds the namespace by that inode,
    not this namespace's ifindex."""
    relays, _ = dirs
    dead = killed_relay(namespace, VETH_A, mode="adopt", inside=True)
    record = RelayRecord.load(control.record_path(dead, relays))
    assert {(a.netns, a.ifindex, a.parent, a.prio, a.handle, a.program)
            for a in record.interfaces} == {
        (None, namespace.ifindex[VETH_A], TC_INGRESS, FASTPATH_INGRESS_PRIO, FILTER_HANDLE,
         "fastpath_ingress"),
        (None, namespace.ifindex[VETH_A], TC_EGRESS, FASTPATH_EGRESS_PRIO, FILTER_HANDLE,
         "fastpath_egress")}
    assert record.netns_inode == control.netns_inode(NETNS_DIR / namespace.name)
    assert record.netns_inode != control.netns_inode()
    rows = json.loads(run_cli(["cleanup", "--json"], capsys).stdout)
    assert sorted((r["action"], r["what"], r["where"]) for r in rows
                  if f"netns {namespace.name}," in r["where"]) == [
        ("removed", "tc filter fastpath_egress",
         f"netns {namespace.name}, {VETH_A} egress prio {FASTPATH_EGRESS_PRIO}"),
        ("removed", "tc filter fastpath_ingress",
         f"netns {namespace.name}, {VETH_A} ingress prio {FASTPATH_INGRESS_PRIO}")]
    assert our_filters(namespace.name, namespace.ifindex[VETH_A]) == set()
    assert list(relays.iterdir()) == []


@pytest.mark.root
def test_orphans_in_this_namespace(namespace: Namespace, tmp_path: Path) -> None:
    """A relay killed before it recorded anything: the scan of the namespace finds its
    filters, and leaves the lab's loss filter alone."""
    killed_relay(namespace, VETH_A, mode="none")
    # The lab's loss filter beside them, its program unheld as after `lab up`: not ours.
    from pyroute2 import IPRoute

    loss = _LossProgram.compile()
    try:
        with IPRoute(netns=namespace.name, flags=0) as ipr:
            _attach_loss_filter(ipr, namespace.ifindex[VETH_A], loss.prog_fd)
    finally:
        loss.close()
    lossy = ("ingress", LOSS_FILTER_PRIO, LOSS_FUNCTION)
    assert our_filters(namespace.name, namespace.ifindex[VETH_A]) == ATTACHED | {lossy}
    env = child_env()
    env[control.RELAYS_DIR_ENV] = str(tmp_path / "relays")
    env[control.PINS_DIR_ENV] = str(tmp_path / "pins")
    argv = ["ip", "netns", "exec", namespace.name, sys.executable, "-m", "relay", "cleanup"]
    done = subprocess.run([*argv, "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert sorted((r["action"], r["what"], r["where"]) for r in rows) == [
        ("removed", "tc filter fastpath_egress", f"this netns, {VETH_A} egress prio 10"),
        ("removed", "tc filter fastpath_ingress", f"this netns, {VETH_A} ingress prio 30")]
    assert our_filters(namespace.name, namespace.ifindex[VETH_A]) == {lossy}
    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert (again.returncode, again.stderr) == (0, "")
    assert again.stdout.startswith("nothing to clean up")


def test_needs_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    run_cli(["cleanup"], capsys, exit_code=1,
            stderr=r"^error: fastrelay cleanup needs root \(CAP_BPF, CAP_NET_ADMIN\); rerun as "
                   r"root\n$")
