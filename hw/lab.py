"""The namespace lab: a topology realised as network namespaces joined by veth pairs.

    from hw.lab import Lab
    with Lab.up("default") as lab:                       # unique name: default-<hex>
        relay = lab.address("relay", "pub1")             # relay's address towards pub1
        s = lab.socket("pub1", socket.AF_INET, socket.SOCK_DGRAM)
        lab.run("sub1", ["ping", "-c1", lab.address("relay", "sub1")], check=True)
        lab.loss_counters("pub1", "relay")               # pub1 -> relay, at relay's ingress
        lab.set_rate("relay", "sub1", "2mbit")           # relay -> sub1, TBF on relay's sub1
    # __exit__ ran lab.down(): namespaces, pins and state file are gone

Realisation (all of it inside namespaces the lab creates; nothing in the caller's):
- one namespace per host, `fr-<lab>-<host>`; <lab> is unique per run (topology name +
  4 hex digits, or given). Loopback up, rp_filter 0, no IPv6 router solicitations.
- one veth pair per link, created directly between the two namespaces. The relay names
  its end after the peer (`pub1`, `sub3`); other hosts use `eth0`, `eth1`... in link
  order. Every interface gets ifindex 1000 + slot (slot = 2 * link + end) and MAC
  02:66:72:00:<slot>, unique within the lab, so one loss program serves every end.
- IPv4 and IPv6 addresses (IPv6 `nodad`, usable at once), permanent neighbour entries
  for the peer (no ARP/ND on the wire, so loss never disturbs resolution), MTU, and on
  every non-relay host default routes via the relay's address on their link.
- sender offloads per end via `ip netns exec NS ethtool -K` (UDP segmentation off on
  publisher links by default, TX checksum offload as the topology says).
- loss: bpf/lossy_link.c, compiled once per lab, attached at clsact ingress
  (preference 1, returns TC_ACT_UNSPEC so later filters still run) of every end with
  loss > 0. The TC filters hold the program; the program, its config map and its
  counter map are pinned under /sys/fs/bpf/fastrelay/labs/<lab>/.
- rate: a TBF qdisc (root) on the sending interface of every direction with a rate
  limit (`at.<host>.rate` limits what arrives at <host>, so the TBF sits on the peer's
  interface: a qdisc shapes egress), set with `tc` inside the namespace. Burst and
  latency: `tbf_parameters`. It shapes the fast path's clones too (a redirect to egress
  goes through the root qdisc).

Crash safety: the state file /run/fastrelay/labs/<lab>.json is written BEFORE anything is
created; `down` (also `down_lab(name)`, the CLI's `lab down`) works from it, sweeps every
namespace named `fr-<lab>-<host>` besides, ends the processes still inside the lab's
namespaces, removes the pins and the state file, and is idempotent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import errno
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path
from typing import Any, Sequence

from hw.topology import NAME_RE, Topology, format_rate, load_topology, parse_rate
from relay import bpfload
from relay.errors import ConfigError, FastrelayError, MissingCapabilityError, NotFoundError

STATE_DIR = Path("/run/fastrelay/labs")
PIN_ROOT = Path("/sys/fs/bpf/fastrelay/labs")
NETNS_DIR = Path("/run/netns")
NS_PREFIX = "fr-"
STATE_VERSION = 1

# --- shared with bpf/lab_structs.h (tests/test_lab.py checks they agree) -------------

LOSS_SOURCE = "lab_structs.h"
LOSS_PROGRAM = "lossy_link.c"
LOSS_FUNCTION = "lossy_link_ingress"
CONFIG_MAP = "lab_link_config"
STATS_MAP = "lab_link_stats"
#: Interfaces get ifindex IFINDEX_BASE + slot.
IFINDEX_BASE = 1000
#: Slots per lab (two per link).
MAX_SLOTS = 2048


class LinkConfig(ctypes.Structure):
    """struct lab_link_config"""

    _fields_ = [("drop_threshold", ctypes.c_uint32), ("enabled", ctypes.c_uint32)]


class LinkStats(ctypes.Structure):
    """struct lab_link_stats (one CPU's share)"""

    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("dropped_packets", ctypes.c_uint64),
        ("dropped_bytes", ctypes.c_uint64),
    ]


def drop_threshold(probability: float) -> int:
    """The u32 the loss program compares bpf_get_prandom_u32() against."""
    if not 0 <= probability < 1:
        raise ConfigError(f"loss {probability!r} must be a probability in [0, 1)")
    return min(round(probability * 2**32), 2**32 - 1)


def tbf_parameters(rate: int, mtu: int) -> tuple[int, int]:
    """(burst bytes, latency µs) of the TBF for `rate` bit/s on a link of `mtu`: a burst of
    two full frames or 10 ms at the rate, whichever is larger (a smaller one could not
    pass a full frame, or would throttle fast links to the timer tick); packets that would
    wait more than 50 ms are dropped, like a router's queue."""
    return max(2 * (mtu + 14), rate // 8 // 100), TBF_LATENCY_US


TBF_LATENCY_US = 50_000

# TC hooks (clsact) and the loss filter's place on them
TC_INGRESS = "ffff:fff2"
LOSS_FILTER_PRIO = 1
LOSS_FILTER_HANDLE = ":1"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


# --- what the lab looks like --------------------------------------------------------


@dataclass(frozen=True)
class Interface:
    """One end of a link as realised: an interface in its host's namespace."""

    host: str
    peer: str
    name: str
    ifindex: int
    slot: int
    mac: str
    ipv4: IPv4Interface
    ipv6: IPv6Interface
    mtu: int
    #: Drop probability of packets arriving here, as the topology says.
    loss: float
    gso: bool
    tx_checksum: bool
    #: Rate limit (bit/s) of packets arriving here, as the topology says: realised by a
    #: TBF on the peer's interface; 0 = none.
    rate: int = 0


@dataclass(frozen=True)
class HostInfo:
    """One host as realised: its namespace and interfaces (one per link)."""

    name: str
    role: str
    netns: str
    interfaces: tuple[Interface, ...]

    def interface_to(self, peer: str) -> Interface:
        for iface in self.interfaces:
            if iface.peer == peer:
                return iface
        peers = ", ".join(i.peer for i in self.interfaces)
        raise NotFoundError(f"host '{self.name}' has no link to '{peer}' (its peers: {peers})")


@dataclass(frozen=True)
class LabInfo:
    """A lab known on this machine (from its state file and/or its namespaces)."""

    name: str
    topology: str
    #: up | building | broken (state file but namespaces missing or build died) |
    #: orphaned (namespaces without a state file)
    status: str
    hosts: int
    links: int
    namespaces_present: int
    created: str | None
    pid: int | None


def netns_name(lab: str, host: str) -> str:
    return f"{NS_PREFIX}{lab}-{host}"


def state_path(lab: str) -> Path:
    return STATE_DIR / f"{lab}.json"


def pin_dir(lab: str) -> Path:
    return PIN_ROOT / lab


def _mac(slot: int) -> str:
    return f"02:66:72:00:{slot >> 8:02x}:{slot & 0xFF:02x}"


def plan(topology: Topology, lab: str) -> dict[str, HostInfo]:
    """Names, indexes and addresses of every namespace and interface, before creating any."""
    if 2 * len(topology.links) > MAX_SLOTS:
        raise ConfigError(f"topology '{topology.name}' has {len(topology.links)} links; the lab "
                          f"supports at most {MAX_SLOTS // 2}")
    ifaces: dict[str, list[Interface]] = {h.name: [] for h in topology.hosts}
    roles = {h.name: h.role for h in topology.hosts}
    for index, link in enumerate(topology.links):
        for end_no, (end, peer) in enumerate(((link.a, link.b), (link.b, link.a))):
            slot = 2 * index + end_no
            own = ifaces[end.host]
            name = peer.host if roles[end.host] == "relay" else f"eth{len(own)}"
            own.append(Interface(
                host=end.host, peer=peer.host, name=name, ifindex=IFINDEX_BASE + slot, slot=slot,
                mac=_mac(slot), ipv4=end.ipv4, ipv6=end.ipv6, mtu=link.mtu, loss=end.loss,
                gso=end.gso, tx_checksum=end.tx_checksum, rate=end.rate,
            ))
    return {
        h.name: HostInfo(h.name, h.role, netns_name(lab, h.name), tuple(ifaces[h.name]))
        for h in topology.hosts
    }


# --- the lab --------------------------------------------------------------------------


class Lab:
    """A running lab. Create with `Lab.up(...)`, reopen with `Lab.attach(name)`.

    Use as a context manager to guarantee `down()`.
    """

    def __init__(self, name: str, topology: Topology, *, created: str | None = None,
                 pid: int | None = None, status: str = "up") -> None:
        self.name = name
        self.topology = topology
        self.created = created
        self.pid = pid
        self.status = status
        #: host name -> HostInfo (namespace, role, interfaces)
        self.hosts: dict[str, HostInfo] = plan(topology, name)
        self._procs: list[subprocess.Popen[Any]] = []
        self._sockets: list[socket.socket] = []

    def __repr__(self) -> str:
        return f"Lab({self.name!r}, topology={self.topology.name!r}, hosts={len(self.hosts)})"

    # creation and removal

    @classmethod
    def up(cls, topology: Topology | str | Path = "default", name: str | None = None) -> Lab:
        """Create the lab; on any failure remove whatever was created and raise.

        `topology` is a Topology, a topology file path or a shipped topology's name.
        `name` defaults to '<topology name>-<4 hex digits>', unused on this machine.
        """
        topo = topology if isinstance(topology, Topology) else load_topology(topology)
        bpfload.require_root("the lab")
        existing = {info.name for info in list_labs()}
        if name is None:
            for _ in range(16):
                name = f"{topo.name}-{secrets.token_hex(2)}"
                if name not in existing:
                    break
            else:
                raise FastrelayError("cannot find an unused lab name; remove old labs "
                                     "with `fastrelay lab down`")
        else:
            check_lab_name(name)
            if name in existing or state_path(name).exists():
                raise FastrelayError(f"lab '{name}' already exists; remove it with "
                                     f"`fastrelay lab down {name}` or choose another name")
        lab = cls(name, topo, created=_now(), pid=os.getpid(), status="building")
        try:
            lab._write_state()  # before anything else exists, so down() finds it all
            _Builder(lab).build()
            lab.status = "up"
            lab._write_state()
        except BaseException:
            try:
                lab.down()
            except Exception:
                pass
            raise
        return lab

    @classmethod
    def attach(cls, name: str) -> Lab:
        """Open a lab another process created, from its state file."""
        check_lab_name(name)
        path = state_path(name)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            known = ", ".join(sorted(i.name for i in list_labs())) or "none"
            raise NotFoundError(f"no lab named '{name}' (labs: {known})") from None
        except (OSError, ValueError) as exc:
            raise FastrelayError(f"cannot read lab state {path}: {exc}") from None
        if data.get("version") != STATE_VERSION or data.get("name") != name:
            raise FastrelayError(f"lab state {path} is from another fastrelay version; "
                                 f"remove the lab with `fastrelay lab down {name}`")
        return cls(name, Topology.from_dict(data["topology"]), created=data.get("created"),
                   pid=data.get("pid"), status=data.get("status", "up"))

    def down(self) -> None:
        """Remove the lab: processes started through it, namespaces (with their links and
        filters), pins and state file. Idempotent."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        for proc in self._procs:
            _end_process(proc.pid, proc)
        self._procs.clear()
        down_lab(self.name, extra_namespaces=[h.netns for h in self.hosts.values()])
        self.status = "down"

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # looking things up

    def host(self, host: str) -> HostInfo:
        try:
            return self.hosts[host]
        except KeyError:
            raise NotFoundError(f"lab '{self.name}' has no host '{host}' "
                                f"(hosts: {_short_list(self.hosts)})") from None

    @property
    def relay(self) -> str:
        """Name of the relay host."""
        return self.topology.relay.name

    @property
    def publishers(self) -> list[str]:
        return [h.name for h in self.topology.publishers]

    @property
    def subscribers(self) -> list[str]:
        return [h.name for h in self.topology.subscribers]

    def netns(self, host: str) -> str:
        return self.host(host).netns

    def interface(self, host: str, peer: str) -> str:
        """Name of the interface in `host`'s namespace on its link to `peer`."""
        self.host(peer)
        return self.host(host).interface_to(peer).name

    def ifindex(self, host: str, peer: str) -> int:
        self.host(peer)
        return self.host(host).interface_to(peer).ifindex

    def mac(self, host: str, peer: str) -> str:
        self.host(peer)
        return self.host(host).interface_to(peer).mac

    def address(self, host: str, peer: str, family: int = 4) -> str:
        """`host`'s address (no prefix) on its link to `peer`; family 4 or 6
        (socket.AF_INET / AF_INET6 are accepted too)."""
        self.host(peer)
        iface = self.host(host).interface_to(peer)
        if family in (4, socket.AF_INET):
            return str(iface.ipv4.ip)
        if family in (6, socket.AF_INET6):
            return str(iface.ipv6.ip)
        raise ValueError(f"family must be 4 or 6, not {family!r}")

    # running things inside hosts

    def socket(self, host: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM,
               proto: int = 0) -> socket.socket:
        """A socket created in `host`'s namespace (usable from this process). down()
        closes the sockets it handed out, since an open socket keeps a namespace alive."""
        from pyroute2.netns import create_socket

        sock = create_socket(self.netns(host), family, type, proto, flags=0)
        self._sockets = [s for s in self._sockets if s.fileno() != -1]
        self._sockets.append(sock)
        return sock

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """argv prefixed so that it runs inside `host` (`ip netns exec NS ...`)."""
        return ["ip", "netns", "exec", self.netns(host), *argv]

    def run(self, host: str, argv: Sequence[str],
            **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run(argv, **kwargs) inside `host`."""
        return subprocess.run(self.command(host, argv), **kwargs)

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen(argv, **kwargs) inside `host`; down() ends it if still running."""
        proc = subprocess.Popen(self.command(host, argv), **kwargs)
        self._procs.append(proc)
        return proc

    # loss

    def loss_counters(self, host_a: str, host_b: str) -> dict[str, Any]:
        """Counters of the direction host_a -> host_b, kept at host_b's ingress.

        Keys: loss (probability in force), attached (is the loss filter on that
        interface), packets, bytes (frames seen, dropped ones included),
        dropped_packets, dropped_bytes. All zero when the filter was never attached.
        """
        self.host(host_a)
        iface = self.host(host_b).interface_to(host_a)
        result: dict[str, Any] = {"loss": 0.0, "attached": False, "packets": 0, "bytes": 0,
                                  "dropped_packets": 0, "dropped_bytes": 0}
        maps = self._open_maps(missing_ok=True)
        if maps is None:
            return result
        config_fd, stats_fd = maps
        try:
            cfg = _read_config(config_fd, iface.slot)
            result["attached"] = bool(cfg.enabled)
            result["loss"] = cfg.drop_threshold / 2**32
            result.update(_read_stats(stats_fd, iface.slot))
        finally:
            os.close(config_fd)
            os.close(stats_fd)
        return result

    def set_loss(self, host_a: str, host_b: str, probability: float) -> None:
        """Change the loss of the direction host_a -> host_b now (attaching the loss
        filter at host_b's interface if needed); counters keep counting."""
        threshold = drop_threshold(probability)
        self.host(host_a)
        iface = self.host(host_b).interface_to(host_a)
        bpfload.require_root("changing lab loss")
        if self._open_maps(missing_ok=True) is None:
            _LossProgram.load_and_pin(self.name).close()
        maps = self._open_maps(missing_ok=False)
        assert maps is not None
        config_fd, stats_fd = maps
        try:
            _write_config(config_fd, iface.slot, threshold)
        finally:
            os.close(config_fd)
            os.close(stats_fd)
        prog_fd = bpfload.obj_get(pin_dir(self.name) / "prog")
        try:
            from pyroute2 import IPRoute

            with IPRoute(netns=self.netns(host_b)) as ipr:
                if not _loss_filter_present(ipr, iface.ifindex):
                    _attach_loss_filter(ipr, iface.ifindex, prog_fd)
        finally:
            os.close(prog_fd)

    # rate

    def set_rate(self, host_a: str, host_b: str, rate: int | str | None) -> None:
        """Limit the direction host_a -> host_b to `rate` now (bit/s, or tc notation such
        as "2mbit"; None or 0 removes the limit): the TBF on host_a's interface to host_b
        is replaced, packets queued in it are dropped."""
        bits = 0 if rate is None else parse_rate(rate)
        self.host(host_b)
        iface = self.host(host_a).interface_to(host_b)
        bpfload.require_root("changing a lab rate")
        if bits:
            _set_tbf(self.netns(host_a), iface.name, bits, iface.mtu, f"{host_a}:{iface.name}")
        else:
            _clear_tbf(self.netns(host_a), iface.name, f"{host_a}:{iface.name}")

    def rate_limit(self, host_a: str, host_b: str) -> dict[str, Any] | None:
        """The TBF in force on the direction host_a -> host_b (on host_a's interface), or
        None. Keys: rate (bit/s), burst (bytes), latency_us, and the qdisc's counters
        packets, bytes, drops, overlimits, backlog (bytes queued now)."""
        self.host(host_b)
        iface = self.host(host_a).interface_to(host_b)
        done = _tc(self.netns(host_a), ["-j", "-s", "qdisc", "show", "dev", iface.name, "root"],
                   f"read the qdisc of {host_a}:{iface.name}")
        for q in json.loads(done.stdout or "[]"):
            if q.get("kind") == "tbf":
                opts = q.get("options", {})
                return {"rate": int(opts.get("rate", 0)) * 8, "burst": int(opts.get("burst", 0)),
                        "latency_us": int(opts.get("lat", 0)),
                        **{k: int(q.get(k, 0))
                           for k in ("packets", "bytes", "drops", "overlimits", "backlog")}}
        return None

    def _open_maps(self, *, missing_ok: bool) -> tuple[int, int] | None:
        base = pin_dir(self.name)
        try:
            config_fd = bpfload.obj_get(base / CONFIG_MAP)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise NotFoundError(f"lab '{self.name}' has no pinned loss maps in {base}") from None
        try:
            stats_fd = bpfload.obj_get(base / STATS_MAP)
        except BaseException:
            os.close(config_fd)
            raise
        return config_fd, stats_fd

    # status

    def status_rows(self) -> list[dict[str, Any]]:
        """One row per interface: host, role, namespace, interface, peer, addresses, MTU,
        configured and actual loss, the configured rate limit of what arrives there
        (rate_in, bit/s, 0 = none; set_rate changes are not reflected), and the loss
        counters of traffic arriving there."""
        present = set(_lab_namespaces(self.name))
        rows = []
        maps = self._open_maps(missing_ok=True) if os.geteuid() == 0 else None
        try:
            for host in self.hosts.values():
                for iface in host.interfaces:
                    row: dict[str, Any] = {
                        "host": host.name, "role": host.role, "namespace": host.netns,
                        "present": host.netns in present, "interface": iface.name,
                        "peer": iface.peer, "ipv4": str(iface.ipv4), "ipv6": str(iface.ipv6),
                        "mtu": iface.mtu, "loss": iface.loss, "rate_in": iface.rate,
                        "packets_in": None, "dropped_in": None,
                    }
                    if maps is not None:
                        cfg = _read_config(maps[0], iface.slot)
                        if cfg.enabled:
                            stats = _read_stats(maps[1], iface.slot)
                            row["loss"] = round(cfg.drop_threshold / 2**32, 6)
                            row["packets_in"] = stats["packets"]
                            row["dropped_in"] = stats["dropped_packets"]
                    rows.append(row)
        finally:
            if maps is not None:
                os.close(maps[0])
                os.close(maps[1])
        return rows

    # state file

    def _write_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        data = {
            "version": STATE_VERSION, "name": self.name, "status": self.status,
            "created": self.created, "pid": self.pid,
            "namespaces": [h.netns for h in self.hosts.values()],
            "pin_dir": str(pin_dir(self.name)),
            "topology": self.topology.to_dict(),
        }
        path = state_path(self.name)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)


# --- building -------------------------------------------------------------------------


class _Builder:
    """Creates one lab's namespaces, links, addresses, routes, offloads and loss filters."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.ipr: dict[str, Any] = {}

    def build(self) -> None:
        from pyroute2 import IPRoute

        lab = self.lab
        if not NETNS_DIR.parent.exists():
            raise MissingCapabilityError(f"{NETNS_DIR.parent} does not exist")
        try:
            for host in lab.hosts.values():
                _create_netns(host.netns)
                _set_sysctls(host.netns)
                self.ipr[host.name] = IPRoute(netns=host.netns)
                self.ipr[host.name].link("set", index=1, state="up")
            self.create_links()
            for host in lab.hosts.values():
                self.configure_host(host)
            self.set_offloads()
            self.set_rates()
            self.attach_loss()
        finally:
            for ipr in self.ipr.values():
                ipr.close()

    def create_links(self) -> None:
        from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.rtnl import RTM_NEWLINK
        from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

        # pyroute2's link('add', kind='veth') cannot set the peer's ifindex, so the
        # RTM_NEWLINK is built here: end a in the socket's namespace, end b (the peer)
        # placed straight into its own namespace by IFLA_NET_NS_FD.
        lab = self.lab
        for index, link in enumerate(lab.topology.links):
            a = lab.hosts[link.a.host].interface_to(link.b.host)
            b = lab.hosts[link.b.host].interface_to(link.a.host)
            fd = os.open(NETNS_DIR / lab.hosts[b.host].netns, os.O_RDONLY)
            try:
                msg = ifinfmsg()
                msg["index"] = a.ifindex
                msg["attrs"] = [
                    ["IFLA_IFNAME", a.name], ["IFLA_MTU", a.mtu], ["IFLA_ADDRESS", a.mac],
                    ["IFLA_LINKINFO", {"attrs": [
                        ["IFLA_INFO_KIND", "veth"],
                        ["IFLA_INFO_DATA", {"attrs": [["VETH_INFO_PEER", {
                            "index": b.ifindex,
                            "attrs": [["IFLA_IFNAME", b.name], ["IFLA_MTU", b.mtu],
                                      ["IFLA_ADDRESS", b.mac], ["IFLA_NET_NS_FD", fd]],
                        }]]}],
                    ]}],
                ]
                msg["header"]["type"] = RTM_NEWLINK
                msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
                self.ipr[a.host].nlm_request_batch([msg])
            except NetlinkError as exc:
                raise FastrelayError(f"cannot create veth pair for link {link.label} "
                                     f"({a.name}/{b.name}): {exc.args[-1]}") from None
            finally:
                os.close(fd)

    def configure_host(self, host: HostInfo) -> None:
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

        lab = self.lab
        ipr = self.ipr[host.name]
        try:
            for iface in host.interfaces:
                peer = lab.hosts[iface.peer].interface_to(host.name)
                i = iface.ifindex
                ipr.addr("add", index=i, address=str(iface.ipv4.ip),
                         prefixlen=iface.ipv4.network.prefixlen)
                ipr.addr("add", index=i, address=str(iface.ipv6.ip),
                         prefixlen=iface.ipv6.network.prefixlen, flags=IFA_F_NODAD)
                for addr in (peer.ipv4.ip, peer.ipv6.ip):
                    ipr.neigh("add", dst=str(addr), lladdr=peer.mac, ifindex=i, state="permanent")
                ipr.link("set", index=i, state="up")
            if host.role != "relay":
                to_relay = [x for x in host.interfaces if lab.hosts[x.peer].role == "relay"]
                if to_relay:
                    gw = lab.hosts[to_relay[0].peer].interface_to(host.name)
                    ipr.route("add", dst="0.0.0.0/0", gateway=str(gw.ipv4.ip))
                    ipr.route("add", dst="::/0", gateway=str(gw.ipv6.ip), family=socket.AF_INET6)
        except NetlinkError as exc:
            raise FastrelayError(f"cannot configure host {host.name} in {host.netns}: "
                                 f"{exc.args[-1]}") from None

    def set_offloads(self) -> None:
        for host in self.lab.hosts.values():
            for iface in host.interfaces:
                features = []
                if not iface.gso:
                    features += ["tx-udp-segmentation", "off"]
                if not iface.tx_checksum:
                    features += ["tx", "off"]
                if not features:
                    continue
                argv = ["ip", "netns", "exec", host.netns, "ethtool", "-K", iface.name, *features]
                try:
                    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
                except FileNotFoundError:
                    raise MissingCapabilityError(
                        "ethtool or ip is not installed; run hw/setup.sh") from None
                if done.returncode != 0:
                    why = (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[0]
                    raise FastrelayError(f"cannot set offloads on {host.name}:{iface.name} "
                                         f"({' '.join(features)}): {why}")

    def set_rates(self) -> None:
        lab = self.lab
        for host in lab.hosts.values():
            for iface in host.interfaces:
                if iface.rate:
                    # what arrives here is shaped where it leaves: the peer's interface
                    sender = lab.hosts[iface.peer]
                    out = sender.interface_to(host.name)
                    _set_tbf(sender.netns, out.name, iface.rate, out.mtu,
                             f"{sender.name}:{out.name}")

    def attach_loss(self) -> None:
        lossy = [i for h in self.lab.hosts.values() for i in h.interfaces if i.loss > 0]
        if not lossy:
            return
        program = _LossProgram.load_and_pin(self.lab.name)
        try:
            for iface in lossy:
                program.configure(iface.slot, drop_threshold(iface.loss))
                _attach_loss_filter(self.ipr[iface.host], iface.ifindex, program.prog_fd)
        finally:
            program.close()


class _LossProgram:
    """bpf/lossy_link.c compiled and loaded, its program and maps pinned for the lab."""

    def __init__(self, bpf: Any, fn: Any) -> None:
        self.bpf = bpf
        self.fn = fn
        self.prog_fd = fn.fd

    @classmethod
    def compile(cls, cflags: Sequence[str] = ()) -> _LossProgram:
        bpf = bpfload.compile_program(LOSS_PROGRAM, cflags=cflags)
        return cls(bpf, bpfload.load_sched_cls(bpf, LOSS_FUNCTION))

    @classmethod
    def load_and_pin(cls, lab: str) -> _LossProgram:
        _require_bpffs()
        program = cls.compile()
        base = pin_dir(lab)
        base.mkdir(parents=True, exist_ok=True)
        try:
            bpfload.obj_pin(program.prog_fd, base / "prog")
            bpfload.obj_pin(program.bpf[CONFIG_MAP.encode()].map_fd, base / CONFIG_MAP)
            bpfload.obj_pin(program.bpf[STATS_MAP.encode()].map_fd, base / STATS_MAP)
        except OSError as exc:
            program.close()
            raise FastrelayError(f"cannot pin the loss program in {base}: {exc.strerror}") from None
        return program

    def configure(self, slot: int, threshold: int) -> None:
        _write_config(self.bpf[CONFIG_MAP.encode()].map_fd, slot, threshold)

    def close(self) -> None:
        self.bpf.cleanup()


def _attach_loss_filter(ipr: Any, ifindex: int, prog_fd: int) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr.tc("add", "clsact", index=ifindex)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise FastrelayError(
                f"cannot add clsact on ifindex {ifindex}: {exc.args[-1]}") from None
    try:
        ipr.tc("add-filter", "bpf", index=ifindex, handle=LOSS_FILTER_HANDLE, fd=prog_fd,
               name=LOSS_FUNCTION, parent=TC_INGRESS, classid=1, direct_action=True,
               prio=LOSS_FILTER_PRIO)
    except NetlinkError as exc:
        raise FastrelayError(f"cannot attach the loss filter on ifindex {ifindex}: "
                             f"{exc.args[-1]}") from None


def _loss_filter_present(ipr: Any, ifindex: int) -> bool:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        filters = ipr.get_filters(index=ifindex, parent=TC_INGRESS)
    except NetlinkError:
        return False
    for f in filters:
        if f.get_attr("TCA_KIND") == "bpf":
            opts = f.get_attr("TCA_OPTIONS")
            if opts is not None and (opts.get_attr("TCA_BPF_NAME") or "").startswith(LOSS_FUNCTION):
                return True
    return False


def _write_config(map_fd: int, slot: int, threshold: int) -> None:
    value = LinkConfig(drop_threshold=threshold, enabled=1)
    bpfload.map_update(map_fd, slot.to_bytes(4, "little"), bytes(value))


def _read_config(map_fd: int, slot: int) -> LinkConfig:
    raw = bpfload.map_lookup(map_fd, slot.to_bytes(4, "little"), ctypes.sizeof(LinkConfig))
    return LinkConfig.from_buffer_copy(raw) if raw else LinkConfig()


def _read_stats(map_fd: int, slot: int) -> dict[str, int]:
    size = ctypes.sizeof(LinkStats)  # 8-byte aligned already: the per-CPU stride
    cpus = bpfload.possible_cpus()
    raw = bpfload.map_lookup(map_fd, slot.to_bytes(4, "little"), size * cpus)
    total = {name: 0 for name, _ in LinkStats._fields_}
    if raw:
        for cpu in range(cpus):
            one = LinkStats.from_buffer_copy(raw, cpu * size)
            for name in total:
                total[name] += getattr(one, name)
    return total


# --- rate limits (tc) -------------------------------------------------------------------


def _tc(netns: str, args: Sequence[str], what: str,
        ok_errors: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    argv = ["ip", "netns", "exec", netns, "tc", *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise MissingCapabilityError("tc or ip is not installed; run hw/setup.sh") from None
    if done.returncode != 0 and not any(e in done.stderr for e in ok_errors):
        why = (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[0]
        raise FastrelayError(f"cannot {what}: {why}")
    return done


def _set_tbf(netns: str, ifname: str, rate: int, mtu: int, label: str) -> None:
    burst, latency = tbf_parameters(rate, mtu)
    _tc(netns, ["qdisc", "replace", "dev", ifname, "root", "tbf", "rate", f"{rate}bit",
                "burst", str(burst), "latency", f"{latency}us"],
        f"set rate {format_rate(rate)} on {label} (TBF)")


def _clear_tbf(netns: str, ifname: str, label: str) -> None:
    # no root qdisc of ours: nothing to remove
    _tc(netns, ["qdisc", "del", "dev", ifname, "root"], f"remove the rate limit on {label}",
        ok_errors=("handle of zero", "No such file", "Invalid handle"))


# --- namespaces, processes, sysctls ----------------------------------------------------


def _create_netns(name: str) -> None:
    from pyroute2 import netns

    if (NETNS_DIR / name).exists():
        raise FastrelayError(f"network namespace {name} already exists")
    try:
        netns.create(name)
    except OSError as exc:
        raise FastrelayError(f"cannot create network namespace {name}: {exc}") from None
    if not (NETNS_DIR / name).exists():
        raise FastrelayError(f"cannot create network namespace {name}")


class _InNetns:
    """Move this thread into a namespace for a moment (sysctls are per namespace)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(NETNS_DIR / self.name, os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                os.close(self.saved)
                raise FastrelayError(f"cannot enter namespace {self.name}: {os.strerror(err)}")
        finally:
            os.close(target)

    def __exit__(self, *exc: object) -> None:
        try:
            if _libc.setns(self.saved, CLONE_NEWNET) != 0:
                raise FastrelayError("cannot return to the original network namespace")
        finally:
            os.close(self.saved)


_SYSCTLS = (
    # rp_filter off: the fast path rewrites sources; strict/loose checks would drop.
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
    # hosts, not routers: no router solicitations or DAD chatter on the links
    ("net/ipv6/conf/all/accept_ra", "0"),
    ("net/ipv6/conf/default/accept_ra", "0"),
    ("net/ipv6/conf/default/router_solicitations", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
)


def _set_sysctls(netns: str) -> None:
    with _InNetns(netns):
        for key, value in _SYSCTLS:
            path = Path("/proc/sys", key)
            try:
                path.write_text(value)
            except OSError as exc:
                raise FastrelayError(f"cannot set {key.replace('/', '.')}={value} in {netns}: "
                                     f"{exc.strerror}") from None


def _lab_namespaces(lab: str) -> list[str]:
    """Namespaces named fr-<lab>-<host> (host without '-', so fr-<lab>-x-y is another lab's)."""
    prefix = f"{NS_PREFIX}{lab}-"
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix) and "-" not in n[len(prefix):]
                  and n[len(prefix):])


def _processes_in(netns_names: Sequence[str]) -> list[int]:
    inodes = set()
    for name in netns_names:
        try:
            inodes.add(os.stat(NETNS_DIR / name).st_ino)
        except OSError:
            pass
    if not inodes:
        return []
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _end_process(pid: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds."""
    if proc is not None and proc.poll() is not None:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return
        elif not _alive(pid):
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if proc is not None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass


def _alive(pid: int) -> bool:
    try:
        # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _require_bpffs() -> None:
    if not os.path.ismount("/sys/fs/bpf"):
        raise MissingCapabilityError("bpffs is not mounted on /sys/fs/bpf; run hw/setup.sh")


# --- module-level operations ---------------------------------------------------------------


def check_lab_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"lab name {name!r} must match {NAME_RE.pattern}")


def down_lab(name: str, *, extra_namespaces: Sequence[str] = ()) -> bool:
    """Remove everything of lab `name` that exists, whatever state it is in (also after
    a crash mid-build). Returns whether anything was found. Idempotent."""
    from pyroute2 import netns as pr_netns

    check_lab_name(name)
    bpfload.require_root("removing a lab")
    found = False
    path = state_path(name)
    namespaces = set(extra_namespaces) | set(_lab_namespaces(name))
    if path.exists():
        found = True
        try:
            namespaces |= set(json.loads(path.read_text()).get("namespaces", []))
        except (OSError, ValueError):
            pass  # a torn state file: the prefix sweep still finds the namespaces
    prefix = f"{NS_PREFIX}{name}-"
    namespaces = {n for n in namespaces if n.startswith(prefix)}
    present = [n for n in sorted(namespaces) if (NETNS_DIR / n).exists()]
    # Processes inside would keep a namespace (and its veths) alive after unmounting.
    for pid in _processes_in(present):
        _end_process(pid)
    for ns in present:
        found = True
        try:
            pr_netns.remove(ns)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise FastrelayError(f"cannot remove network namespace {ns}: {exc}") from None
    pins = pin_dir(name)
    if pins.exists():
        found = True
        for entry in pins.iterdir():
            entry.unlink()
        pins.rmdir()
    for leftover in STATE_DIR.glob(f"{name}.json.tmp*"):
        leftover.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    return found


def list_labs() -> list[LabInfo]:
    """Every lab on this machine: those with state files and orphaned namespaces."""
    labs: dict[str, LabInfo] = {}
    ns_by_lab: dict[str, list[str]] = {}
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        names = []
    for n in names:
        m = re.match(rf"^{re.escape(NS_PREFIX)}(.+)-([^-]+)$", n)
        if m and NAME_RE.match(m.group(1)):
            ns_by_lab.setdefault(m.group(1), []).append(n)
    for path in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []:
        name = path.stem
        try:
            data = json.loads(path.read_text())
            topo = data["topology"]
            expected = data.get("namespaces", [])
            present = len([n for n in ns_by_lab.get(name, []) if n in expected])
            status = data.get("status", "up")
            pid = data.get("pid")
            if status == "building" and not (isinstance(pid, int) and _alive(pid)):
                status = "broken"
            elif status == "up" and present < len(expected):
                status = "broken"
            labs[name] = LabInfo(name, topo.get("name", "?"), status, len(topo.get("hosts", [])),
                                 len(topo.get("links", [])), present, data.get("created"), pid)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            labs[name] = LabInfo(name, "?", "broken", 0, 0, len(ns_by_lab.get(name, [])),
                                 None, None)
    for name, nss in ns_by_lab.items():
        if name not in labs:
            labs[name] = LabInfo(name, "?", "orphaned", len(nss), 0, len(nss), None, None)
    return sorted(labs.values(), key=lambda i: i.name)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _short_list(names: Any, limit: int = 8) -> str:
    names = list(names)
    text = ", ".join(names[:limit])
    return text + (f", ... ({len(names)} in all)" if len(names) > limit else "")
