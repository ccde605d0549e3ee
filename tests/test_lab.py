"""hw/lab.py, bpf/lossy_link.c and `fastrelay lab`: real namespaces, veths and TC programs.

Every lab here gets a unique name (LAB_PREFIX + random hex) and is removed by a finalizer
that also asserts nothing is left: no namespace, no pinned map, no state file, and the
loss program gone from the kernel (so no TC filter holds it any more).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from hw import lab as labmod
from hw.lab import (
    IFINDEX_BASE,
    MAX_SLOTS,
    NETNS_DIR,
    Lab,
    LinkConfig,
    LinkStats,
    down_lab,
    drop_threshold,
    list_labs,
    pin_dir,
    plan,
    state_path,
    tbf_parameters,
)
from hw.topology import load_topology, loads_topology
from relay import bpfload
from relay.errors import ConfigError, FastrelayError, NotFoundError
from relay.paths import BPF_DIR
from tests.conftest import run_cli, run_cli_process

LAB_PREFIX = "t"
SO_RCVBUFFORCE = 33
TC_ACT_UNSPEC = 0xFFFFFFFF  # -1 as the u32 retval
TC_ACT_SHOT = 2

LOSSY = """
name = "lossy"
[[host]]
name = "pub1"
role = "publisher"
[[host]]
name = "relay"
role = "relay"
[[host]]
name = "sub1"
role = "subscriber"
[[link]]
hosts = ["relay", "pub1"]
at.relay.loss = 0.1
[[link]]
hosts = ["relay", "sub1"]
"""

RATED = """
name = "rated"
[[host]]
name = "pub1"
role = "publisher"
[[host]]
name = "relay"
role = "relay"
[[host]]
name = "slow"
role = "subscriber"
[[link]]
hosts = ["relay", "pub1"]
[[link]]
hosts = ["relay", "slow"]
at.slow.rate = "2mbit"
"""


def unique_name() -> str:
    return f"{LAB_PREFIX}{os.getpid() % 10000}-{secrets.token_hex(3)}"


# --- pure: the C/Python contract and the plan ----------------------------------------------


def _header() -> str:
    return (BPF_DIR / labmod.LOSS_SOURCE).read_text()


_C_TYPES = {"__u32": ctypes.c_uint32, "__u64": ctypes.c_uint64}


def _c_struct(name: str) -> list[tuple[str, type]]:
    body = re.search(rf"struct {name} \{{(.*?)\}};", _header(), re.S)
    assert body, f"struct {name} not in {labmod.LOSS_SOURCE}"
    fields = re.findall(r"^\s*(__u\d+)\s+(\w+);", body.group(1), re.M)
    return [(field, _C_TYPES[ctype]) for ctype, field in fields]


@pytest.mark.parametrize("cname,pyclass", [("lab_link_config", LinkConfig),
                                          ("lab_link_stats", LinkStats)])
def test_ctypes_structs_match_lab_structs_h(cname: str, pyclass: type[ctypes.Structure]) -> None:
    assert [(n, t) for n, t in pyclass._fields_] == _c_struct(cname)


def test_constants_match_lab_structs_h() -> None:
    defines = dict(re.findall(r"#define (LAB_\w+) (\d+)", _header()))
    assert int(defines["LAB_IFINDEX_BASE"]) == IFINDEX_BASE
    assert int(defines["LAB_MAX_SLOTS"]) == MAX_SLOTS
    source = (BPF_DIR / labmod.LOSS_PROGRAM).read_text()
    for name in (labmod.CONFIG_MAP, labmod.STATS_MAP, labmod.LOSS_FUNCTION):
        assert name in source


def test_drop_threshold_is_probability_times_2_32() -> None:
    assert drop_threshold(0) == 0
    assert drop_threshold(0.5) == 2**31
    assert drop_threshold(0.1) == round(0.1 * 2**32)
    assert drop_threshold(0.9999999999999) == 2**32 - 1
    with pytest.raises(ConfigError, match=r"loss 1 must be a probability"):
        drop_threshold(1)


def test_plan_names_indexes_and_macs() -> None:
    hosts = plan(load_topology("fanout64"), "x-1")
    assert hosts["relay"].netns == "fr-x-1-relay"
    assert hosts["sub7"].interface_to("relay").name == "eth0"
    assert hosts["relay"].interface_to("sub7").name == "sub7"
    ifaces = [i for h in hosts.values() for i in h.interfaces]
    assert len(ifaces) == 130
    assert len({i.ifindex for i in ifaces}) == len({i.mac for i in ifaces}) == 130
    assert min(i.ifindex for i in ifaces) == IFINDEX_BASE
    with pytest.raises(NotFoundError,
                       match=r"host 'sub7' has no link to 'pub1' \(its peers: relay\)"):
        hosts["sub7"].interface_to("pub1")


def test_plan_rate_is_of_what_arrives_and_tbf_parameters() -> None:
    hosts = plan(loads_topology(RATED, source="RATED"), "x-1")
    assert hosts["slow"].interface_to("relay").rate == 2_000_000
    assert hosts["relay"].interface_to("slow").rate == 0
    assert tbf_parameters(2_000_000, 1500) == (3028, 50_000)  # two full frames
    assert tbf_parameters(1_000_000_000, 1500) == (1_250_000, 50_000)  # 10 ms


def test_cli_bad_topology_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(LOSSY + "jitter = 3\n")
    result = run_cli(["lab", "up", str(path)], capsys, exit_code=1)
    assert result.stderr == (f"error: {path}: unknown field 'jitter' in [[link]] #2 (allowed: "
                             "hosts, mtu, loss, rate, gso, tx_checksum, ipv4, ipv6, at)\n")


def test_cli_address_clash_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "clash.toml"
    path.write_text(LOSSY.replace('at.relay.loss = 0.1', 'ipv4 = "10.5.0.0/24"')
                    + 'ipv4 = "10.5.0.0/25"\n')
    result = run_cli(["lab", "up", str(path)], capsys, exit_code=1)
    assert re.fullmatch(r"error: .*clash.toml: address clash: subnets 10.5.0.0/24 and 10.5.0.0/25 "
                        r"overlap \(.*\)\n", result.stderr), result.stderr


def test_cli_unknown_topology_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(["lab", "up", "no_such_topology"], capsys, exit_code=1,
            stderr=r"^error: no topology named 'no_such_topology' .*\(available: .*default.*\)\n$")


def test_cli_down_needs_a_name_or_all(capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(["lab", "down"], capsys, exit_code=2, stderr=r"give a lab NAME or --all")


def test_cli_bad_lab_name_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(["lab", "status", "Bad Name"], capsys, exit_code=1,
            stderr=r"^error: lab name 'Bad Name' must match .*\n$")


# --- root: helpers ---------------------------------------------------------------------

BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15


class _IdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


def prog_id_of_pin(path: Path) -> int:
    fd = bpfload.obj_get(path)
    try:
        info = ctypes.create_string_buffer(256)  # struct bpf_prog_info starts: u32 type, u32 id
        bpfload._bpf(BPF_OBJ_GET_INFO_BY_FD,
                     _InfoAttr(bpf_fd=fd, info_len=256, info=ctypes.addressof(info)))
        return struct.unpack_from("<II", info.raw)[1]
    finally:
        os.close(fd)


def prog_exists(prog_id: int) -> bool:
    try:
        fd = bpfload._bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id))
    except OSError as exc:
        assert exc.errno == errno.ENOENT
        return False
    os.close(fd)
    return True


def assert_nothing_left(name: str, prog_id: int | None = None) -> None:
    assert not [n for n in os.listdir(NETNS_DIR) if n.startswith(f"fr-{name}-")] \
        if NETNS_DIR.exists() else True
    assert not pin_dir(name).exists()
    assert not state_path(name).exists()
    assert name not in {i.name for i in list_labs()}
    if prog_id is not None:
        # namespaces are dismantled asynchronously: the filter (and so the program) goes soon
        deadline = time.monotonic() + 10
        while prog_exists(prog_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not prog_exists(prog_id), f"loss program {prog_id} still loaded after down"


def root_links() -> set[tuple[int, str]]:
    """(ifindex, name) of every link in the test's own (root) network namespace."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    links = set()
    for line in out.splitlines():
        index, name = line.split(":", 2)[:2]
        links.add((int(index), name.strip().split("@", 1)[0]))
    return links


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    name = unique_name()
    lab = Lab.up("default", name=name)
    try:
        yield lab
    finally:
        lab.down()
        assert_nothing_left(name)


@pytest.fixture
def lossy_lab() -> Iterator[Lab]:
    name = unique_name()
    lab = Lab.up(loads_topology(LOSSY, source="LOSSY"), name=name)
    prog_id = prog_id_of_pin(pin_dir(name) / "prog")
    try:
        yield lab
    finally:
        lab.down()
        assert_nothing_left(name, prog_id)


def drain(sock: socket.socket, seconds: float) -> list[bytes]:
    """Receive until `seconds` pass without a datagram (bounded in time)."""
    got = []
    sock.settimeout(seconds)
    while True:
        try:
            got.append(sock.recv(65536))
        except (socket.timeout, BlockingIOError):
            return got


# --- root: the default lab ---------------------------------------------------------------


@pytest.mark.root
def test_lab_has_every_host_in_its_own_namespace(lab: Lab) -> None:
    assert set(lab.hosts) == {"pub1", "relay", "sub1", "sub2", "sub3"}
    assert lab.relay == "relay" and lab.publishers == ["pub1"]
    assert lab.subscribers == ["sub1", "sub2", "sub3"]
    for host in lab.hosts.values():
        assert host.netns == f"fr-{lab.name}-{host.name}"
        assert (NETNS_DIR / host.netns).exists()
    assert lab.interface("relay", "sub2") == "sub2"
    assert lab.interface("sub2", "relay") == "eth0"
    assert lab.address("relay", "sub2") == "10.101.2.1"
    assert lab.address("sub2", "relay", 6) == "fd00:fa57:101:2::2"
    assert lab.address("sub2", "relay", socket.AF_INET6) == "fd00:fa57:101:2::2"
    info = next(i for i in list_labs() if i.name == lab.name)
    assert (info.status, info.hosts, info.links, info.namespaces_present) == ("up", 5, 4, 5)


@pytest.mark.root
def test_lookup_errors_name_the_lab_and_what_is_missing(lab: Lab) -> None:
    with pytest.raises(NotFoundError, match=rf"lab '{lab.name}' has no host 'sub9'"):
        lab.address("sub9", "relay")
    with pytest.raises(NotFoundError, match=r"host 'sub1' has no link to 'pub1'"):
        lab.interface("sub1", "pub1")


@pytest.mark.root
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_udp_crosses_publisher_relay_each_subscriber(lab: Lab, family: int) -> None:
    fam = 4 if family == socket.AF_INET else 6
    relay_in = lab.socket("relay", family, socket.SOCK_DGRAM)
    relay_in.bind((lab.address("relay", "pub1", fam), 4433))
    subs = {}
    for sub in lab.subscribers:
        s = lab.socket(sub, family, socket.SOCK_DGRAM)
        s.bind((lab.address(sub, "relay", fam), 5000))
        subs[sub] = s
    pub = lab.socket("pub1", family, socket.SOCK_DGRAM)
    pub.sendto(b"object 1", (lab.address("relay", "pub1", fam), 4433))

    relay_in.settimeout(5)
    data, src = relay_in.recvfrom(2048)
    assert data == b"object 1" and src[0] == lab.address("pub1", "relay", fam)
    relay_out = lab.socket("relay", family, socket.SOCK_DGRAM)
    for sub in subs:
        relay_out.sendto(data, (lab.address(sub, "relay", fam), 5000))
    for sub, s in subs.items():
        s.settimeout(5)
        got, src = s.recvfrom(2048)
        assert got == b"object 1", sub
        assert src[0] == lab.address("relay", sub, fam), sub
    for s in (relay_in, relay_out, pub, *subs.values()):
        s.close()


@pytest.mark.root
def test_subscribers_reach_every_relay_address_but_not_each_other(lab: Lab) -> None:
    # default routes point at the relay; the relay does not forward between hosts
    ok = lab.run("sub1", ["ping", "-c1", "-W2", lab.address("relay", "pub1")],
                 capture_output=True, timeout=10)
    assert ok.returncode == 0, ok.stderr
    ok6 = lab.run("sub1", ["ping", "-6", "-c1", "-W2", lab.address("relay", "sub3", 6)],
                  capture_output=True, timeout=10)
    assert ok6.returncode == 0, ok6.stderr
    blocked = lab.run("sub1", ["ping", "-c1", "-W1", lab.address("sub2", "relay")],
                      capture_output=True, timeout=10)
    assert blocked.returncode != 0


@pytest.mark.root
def test_host_settings_mtu_offloads_sysctls_neighbours(lab: Lab) -> None:
    def out(host: str, *argv: str) -> str:
        done = lab.run(host, list(argv), capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "mtu 1500" in out("relay", "ip", "link", "show", "sub1")
    assert "tx-udp-segmentation: off" in out("pub1", "ethtool", "-k", "eth0")
    assert "tx-udp-segmentation: off" in out("relay", "ethtool", "-k", "pub1")
    assert "tx-udp-segmentation: on" in out("sub1", "ethtool", "-k", "eth0")
    assert out("sub1", "sysctl", "-n", "net.ipv4.conf.all.rp_filter").strip() == "0"
    assert out("sub1", "sysctl", "-n", "net.ipv4.conf.eth0.rp_filter").strip() == "0"
    assert "state UNKNOWN" in out("sub1", "ip", "link", "show", "lo") or \
        "UP" in out("sub1", "ip", "link", "show", "lo")
    neigh = out("relay", "ip", "neigh", "show", "dev", "sub1")
    assert f"{lab.address('sub1', 'relay')} lladdr {lab.mac('sub1', 'relay')} PERMANENT" in neigh
    assert "default via 10.101.1.1" in out("sub1", "ip", "route")
    assert "nodad" in out("sub1", "ip", "-6", "addr", "show", "dev", "eth0")


@pytest.mark.root
def test_attach_reads_the_state_file(lab: Lab) -> None:
    other = Lab.attach(lab.name)
    assert other.topology == lab.topology
    assert other.hosts == lab.hosts
    assert other.status == "up"


@pytest.mark.root
def test_cli_status_json_and_exec(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    result = run_cli(["lab", "status", lab.name, "--json"], capsys)
    data = json.loads(result.stdout)
    assert (data["name"], data["topology"], data["status"]) == (lab.name, "default", "up")
    row = next(r for r in data["interfaces"] if (r["host"], r["peer"]) == ("sub3", "relay"))
    assert row["interface"] == "eth0" and row["ipv4"] == "10.101.3.2/24" and row["present"] is True
    listing = json.loads(run_cli(["lab", "status", "--json"], capsys).stdout)
    assert any(r["name"] == lab.name and r["status"] == "up" for r in listing)

    relay = lab.address("relay", "sub1")
    done = run_cli_process(["lab", "exec", "--lab", lab.name, "sub1", "--",
                            "ping", "-c1", "-W2", relay], timeout=30)
    assert done.returncode == 0 and "1 received" in done.stdout, done
    done = run_cli_process(["lab", "exec", "--lab", lab.name, "relay", "--", "sh", "-c", "exit 7"],
                           timeout=30)
    assert done.returncode == 7
    done = run_cli_process(["lab", "exec", "--lab", lab.name, "nosuch", "--", "true"], timeout=30)
    assert done.returncode == 1
    assert done.stderr == (f"error: lab '{lab.name}' has no host 'nosuch' "
                           f"(hosts: pub1, relay, sub1, sub2, sub3)\n")


@pytest.mark.root
def test_cli_missing_lab_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    run_cli(["lab", "status", "no-such-lab"], capsys, exit_code=1,
            stderr=r"^error: no lab named 'no-such-lab' \(labs: .*\)\n$")
    run_cli(["lab", "exec", "--lab", "no-such-lab", "sub1", "--", "true"], capsys, exit_code=1,
            stderr=r"^error: no lab named 'no-such-lab'")


@pytest.mark.root
def test_name_in_use_is_refused(lab: Lab) -> None:
    with pytest.raises(FastrelayError, match=rf"lab '{lab.name}' already exists"):
        Lab.up("default", name=lab.name)
    assert (NETNS_DIR / lab.hosts["relay"].netns).exists()  # the refusal removed nothing


@pytest.mark.root
def test_two_labs_of_one_topology_run_side_by_side() -> None:
    with Lab.up("default") as one, Lab.up("default") as two:
        assert one.name != two.name and one.name.startswith("default-")
        for lab in (one, two):
            done = lab.run("sub1", ["ping", "-c1", "-W2", lab.address("relay", "sub1")],
                           capture_output=True, timeout=10)
            assert done.returncode == 0
        names = (one.name, two.name)
    for name in names:
        assert_nothing_left(name)


# --- root: loss --------------------------------------------------------------------------


@pytest.mark.root
def test_ten_percent_loss_drops_close_to_ten_percent(lossy_lab: Lab) -> None:
    lab, n, p = lossy_lab, 10_000, 0.1
    dst = (lab.address("relay", "pub1"), 6000)
    rx = lab.socket("relay", socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    rx.bind(dst)
    rx.setblocking(False)
    tx = lab.socket("pub1", socket.AF_INET, socket.SOCK_DGRAM)
    before = lab.loss_counters("pub1", "relay")
    assert before["attached"] and abs(before["loss"] - p) < 1e-9

    received = set()
    for i in range(n):  # paced by draining the receiver as we go
        tx.sendto(i.to_bytes(4, "big") * 32, dst)
        while True:
            try:
                received.add(int.from_bytes(rx.recv(2048)[:4], "big"))
            except BlockingIOError:
                break
    received.update(int.from_bytes(d[:4], "big") for d in drain(rx, 0.3))
    after = lab.loss_counters("pub1", "relay")
    lost = n - len(received)

    # Each packet is dropped independently with p (a fresh bpf_get_prandom_u32() against the
    # threshold), so lost ~ Binomial(n, p): sigma = sqrt(10000 * 0.1 * 0.9) = 30 packets.
    # 5 sigma (850..1150 lost) makes a false failure about 6e-7 per run (normal tail,
    # two-sided), while a wrong rate such as 8% or 12% (200 packets off) still fails.
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(lost - n * p) <= 5 * sigma, f"lost {lost} of {n}"
    # The counter agrees: every lost packet was dropped by the program. Frames other than
    # ours (IPv6 multicast listener reports) may arrive in the window too; only they can
    # account for any difference.
    seen = after["packets"] - before["packets"]
    dropped = after["dropped_packets"] - before["dropped_packets"]
    assert seen >= n
    assert lost <= dropped <= lost + (seen - n), (lost, dropped, seen)
    assert after["dropped_bytes"] - before["dropped_bytes"] >= lost * (128 + 42)
    print(f"\nlost {lost} of {n} (expected {n * p:.0f} +- {5 * sigma:.0f}); the program saw "
          f"{seen} and dropped {dropped}")
    # loss is at the receiving end only: the reverse direction has no filter
    assert lab.loss_counters("relay", "pub1")["attached"] is False
    rx.close()
    tx.close()


@pytest.mark.root
def test_reverse_direction_is_lossless_and_set_loss_counts_it(lossy_lab: Lab) -> None:
    lab, n = lossy_lab, 500
    lab.set_loss("relay", "pub1", 0.0)  # attach a counting-only filter at pub1's ingress
    counters = lab.loss_counters("relay", "pub1")
    assert counters["attached"] and counters["loss"] == 0
    rx = lab.socket("pub1", socket.AF_INET6, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    rx.bind((lab.address("pub1", "relay", 6), 6001))
    tx = lab.socket("relay", socket.AF_INET6, socket.SOCK_DGRAM)
    for i in range(n):
        tx.sendto(b"x" * 100, (lab.address("pub1", "relay", 6), 6001))
    assert len(drain(rx, 0.5)) == n
    after = lab.loss_counters("relay", "pub1")
    assert after["packets"] >= n and after["dropped_packets"] == 0
    status = {(r["host"], r["peer"]): r for r in lab.status_rows()}
    assert status[("pub1", "relay")]["packets_in"] == after["packets"]
    assert status[("relay", "pub1")]["loss"] == 0.1
    with pytest.raises(ConfigError, match=r"loss 1.5 must be a probability"):
        lab.set_loss("relay", "pub1", 1.5)
    rx.close()
    tx.close()


# --- root: the loss program alone (BPF_PROG_TEST_RUN) ------------------------------------------


def udp_frame(payload: bytes = b"x" * 64) -> bytes:
    """Ethernet + IPv4 + UDP, checksums zero (the program does not look at them)."""
    eth = bytes.fromhex("020000000002" "020000000001") + struct.pack("!H", 0x0800)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 0, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    udp = struct.pack("!HHHH", 1234, 4433, 8 + len(payload), 0)
    return eth + ip + udp + payload


@pytest.fixture(scope="module")
def loss_program() -> Iterator[labmod._LossProgram]:
    # BPF_PROG_TEST_RUN hands the program an skb on loopback (ifindex 1): base 1 makes
    # that slot 0.
    program = labmod._LossProgram.compile(cflags=["-DLAB_IFINDEX_BASE=1"])
    try:
        yield program
    finally:
        program.close()


def _stats(program: labmod._LossProgram, slot: int = 0) -> dict[str, int]:
    return labmod._read_stats(program.bpf[labmod.STATS_MAP.encode()].map_fd, slot)


def _disable(program: labmod._LossProgram, slot: int = 0) -> None:
    bpfload.map_update(program.bpf[labmod.CONFIG_MAP.encode()].map_fd, slot.to_bytes(4, "little"),
                       bytes(LinkConfig()))


CASES = [
    # description, threshold (None = slot disabled), frame, expected verdict, counted, dropped
    ("disabled slot passes uncounted", None, udp_frame(), TC_ACT_UNSPEC, False, False),
    ("zero loss passes and counts", 0, udp_frame(), TC_ACT_UNSPEC, True, False),
    ("highest threshold drops", 2**32 - 1, udp_frame(), TC_ACT_SHOT, True, True),
    # the kernel's test run wants a whole IP header behind an IP ethertype; a bare
    # Ethernet header works with a non-IP one (0x88b5, local experimental)
    ("bare Ethernet frame counts", 0, udp_frame()[:12] + b"\x88\xb5", TC_ACT_UNSPEC, True, False),
    ("highest threshold drops a bare frame", 2**32 - 1, udp_frame()[:12] + b"\x88\xb5",
     TC_ACT_SHOT, True, True),
    ("large frame counts its bytes", 0, udp_frame(b"y" * 1400), TC_ACT_UNSPEC, True, False),
]


@pytest.mark.root
@pytest.mark.parametrize("threshold,frame,verdict,counted,dropped",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_loss_program_verdicts_and_counters(loss_program: labmod._LossProgram,
                                            threshold: int | None, frame: bytes, verdict: int,
                                            counted: bool, dropped: bool) -> None:
    if threshold is None:
        _disable(loss_program)
    else:
        loss_program.configure(0, threshold)
    before = _stats(loss_program)
    result = bpfload.prog_test_run(loss_program.prog_fd, frame)
    after = _stats(loss_program)
    delta = {k: after[k] - before[k] for k in after}
    assert result.retval == verdict
    assert delta == {
        "packets": int(counted), "bytes": len(frame) * counted,
        "dropped_packets": int(dropped), "dropped_bytes": len(frame) * dropped,
    }
    if verdict == TC_ACT_UNSPEC:
        assert result.data == frame  # passes unchanged


@pytest.mark.root
def test_loss_program_drop_rate_matches_threshold(loss_program: labmod._LossProgram) -> None:
    n, p = 20_000, 0.25
    loss_program.configure(0, drop_threshold(p))
    before = _stats(loss_program)
    bpfload.prog_test_run(loss_program.prog_fd, udp_frame(), repeat=n)
    after = _stats(loss_program)
    seen = after["packets"] - before["packets"]
    dropped = after["dropped_packets"] - before["dropped_packets"]
    assert seen == n
    assert abs(dropped - n * p) <= 5 * (n * p * (1 - p)) ** 0.5, dropped


@pytest.mark.root
def test_loss_program_ignores_interfaces_outside_the_lab() -> None:
    # compiled with the real base, loopback (ifindex 1) is not a lab slot
    program = labmod._LossProgram.compile()
    try:
        program.configure(0, 2**32 - 1)
        result = bpfload.prog_test_run(program.prog_fd, udp_frame())
        assert result.retval == TC_ACT_UNSPEC
        assert _stats(program)["packets"] == 0
    finally:
        program.close()


# --- root: removal, also after crashes ----------------------------------------------------------


@pytest.mark.root
def test_up_down_leaves_no_namespace_link_filter_pin_or_state() -> None:
    name = unique_name()
    lab = Lab.up(loads_topology(LOSSY, source="LOSSY"), name=name)
    try:
        prog_id = prog_id_of_pin(pin_dir(name) / "prog")
        assert prog_exists(prog_id)
        filters = lab.run("relay", ["tc", "filter", "show", "dev", "pub1", "ingress"],
                          capture_output=True, text=True, timeout=10).stdout
        assert f"id {prog_id} " in filters and "lossy_link_ingress direct-action" in filters
        assert sorted(p.name for p in pin_dir(name).iterdir()) == [
            "lab_link_config", "lab_link_stats", "prog"]
        assert state_path(name).exists()
        lab_links = {(i.ifindex, i.name) for h in lab.hosts.values() for i in h.interfaces}
        assert len(lab_links) == 4 and not lab_links & root_links()  # veths live in the lab only
    finally:
        lab.down()
    assert_nothing_left(name, prog_id)
    assert not lab_links & root_links()
    lab.down()  # idempotent
    assert down_lab(name) is False


@pytest.mark.root
def test_down_ends_processes_left_in_the_lab() -> None:
    name = unique_name()
    lab = Lab.up("default", name=name)
    try:
        tracked = lab.popen("sub1", ["sleep", "60"])
        untracked = subprocess.Popen(lab.command("relay", ["sleep", "60"]))
        sock = lab.socket("sub2", socket.AF_INET, socket.SOCK_DGRAM)
    finally:
        lab.down()
    # down returned (every wait inside it is bounded) and the processes are gone
    assert tracked.wait(timeout=10) is not None
    assert untracked.wait(timeout=10) == -signal.SIGTERM
    assert sock.fileno() == -1
    assert_nothing_left(name)


_CRASHER = """
import os, sys
from hw.lab import Lab
lab = Lab.up(sys.argv[1], name=sys.argv[2])
os._exit(0)   # no down(): a crash after a complete up
"""


@pytest.mark.root
@pytest.mark.parametrize("when", ["mid-build", "after-up"])
def test_down_after_a_crash_removes_everything(when: str) -> None:
    name = unique_name()
    topology = "fanout64" if when == "mid-build" else "default"
    proc = subprocess.Popen([sys.executable, "-c", _CRASHER, topology, name],
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        if when == "mid-build":
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                if len([n for n in os.listdir(NETNS_DIR) if n.startswith(f"fr-{name}-")]) >= 3:
                    break
                time.sleep(0.005)
            assert proc.poll() is None, "the build finished before it could be interrupted"
            proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) in (0, -signal.SIGKILL)
        assert state_path(name).exists()
        info = next(i for i in list_labs() if i.name == name)
        assert info.status == ("broken" if when == "mid-build" else "up")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        down_lab(name)
    assert_nothing_left(name)


@pytest.mark.root
def test_down_sweeps_the_lab_prefix_and_only_it() -> None:
    from pyroute2 import netns

    name = unique_name()
    ghost = f"fr-{name}-ghost"          # this lab's, though no state file names it
    other = f"fr-{name}-x-ghost"        # lab '<name>-x', not this one
    netns.create(ghost)
    netns.create(other)
    try:
        assert {i.name: i.status for i in list_labs()}.get(name) == "orphaned"
        assert down_lab(name) is True
        assert not (NETNS_DIR / ghost).exists()
        assert (NETNS_DIR / other).exists()
    finally:
        for ns in (ghost, other):
            if (NETNS_DIR / ns).exists():
                netns.remove(ns)
    assert_nothing_left(name)


# --- root: rate limits ---------------------------------------------------------------------


@pytest.mark.root
def test_rate_is_a_tbf_on_the_sending_interface_and_set_rate_changes_it() -> None:
    with Lab.up(loads_topology(RATED, source="RATED"), name=unique_name()) as lab:
        # what arrives at slow is limited: the TBF sits on the relay's interface `slow`
        tbf = lab.rate_limit("relay", "slow")
        assert tbf is not None and (tbf["rate"], tbf["burst"], tbf["latency_us"]) == (
            2_000_000, 3028, 50_000), tbf
        assert lab.rate_limit("slow", "relay") is None
        assert lab.rate_limit("relay", "pub1") is None
        rows = {(r["host"], r["peer"]): r["rate_in"] for r in lab.status_rows()}
        assert (rows[("slow", "relay")], rows[("relay", "slow")]) == (2_000_000, 0)

        # 2 MB offered at once to a 2 Mbit/s link with a 50 ms queue: the TBF holds most back
        n, size = 2000, 1000
        dst = (lab.address("slow", "relay"), 6002)
        rx = lab.socket("slow", socket.AF_INET, socket.SOCK_DGRAM)
        rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        rx.bind(dst)
        tx = lab.socket("relay", socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(n):
            try:
                tx.sendto(b"r" * size, dst)
            except OSError:
                pass  # a full qdisc may refuse the send: that is shaping too
        received = len(drain(rx, 0.5))
        after = lab.rate_limit("relay", "slow")
        assert after is not None
        assert 0 < received < n / 2, received
        assert after["drops"] > 0 and after["overlimits"] > 0, after

        lab.set_rate("relay", "slow", "500kbit")
        tbf = lab.rate_limit("relay", "slow")
        assert tbf is not None and tbf["rate"] == 500_000, tbf
        lab.set_rate("slow", "relay", 10_000_000)  # the other direction, now limited too
        tbf = lab.rate_limit("slow", "relay")
        assert tbf is not None and tbf["rate"] == 10_000_000, tbf
        lab.set_rate("relay", "slow", None)
        assert lab.rate_limit("relay", "slow") is None
        lab.set_rate("relay", "slow", 0)  # nothing to remove: still fine
        with pytest.raises(ConfigError, match=r"rate '2mb' is not a rate"):
            lab.set_rate("relay", "slow", "2mb")
        done = lab.run("slow", ["ping", "-c1", "-W2", lab.address("relay", "slow")],
                       capture_output=True, timeout=10)
        assert done.returncode == 0
        rx.close()
        tx.close()
