"""Lab topology files: hosts, links, addresses, MTU, loss, rate limits and offloads, loaded
from TOML.

A topology says what the lab looks like; `hw.lab` realises it as network namespaces
(and, later, the deployment maps it onto physical hosts). Loading validates strictly:
any unknown field is rejected naming the field and the file, and every problem is one
`ConfigError` line.

File format (`hw/topologies/default.toml` is a commented example)::

    name = "default"              # optional; default: the file's stem. [a-z0-9][a-z0-9_-]*
    description = "..."           # optional

    [addressing]                  # optional: pools for links without an explicit subnet
    ipv4 = "10.200.0.0/16"        # one /24 per link, taken in link order from the 2nd on
    ipv6 = "fd00:fa57::/48"       # one /64 per link, likewise

    [[host]]
    name = "pub1"                 # [a-z][a-z0-9_]*, at most 15 characters (an interface
    role = "publisher"            # name on the relay); publisher | relay | subscriber

    [[host]]
    name = "sub"
    role = "subscriber"
    count = 8                     # a group: hosts sub1 .. sub8

    [[link]]
    hosts = ["relay", "sub"]      # two hosts; one may be a group: one link per member
    mtu = 1500                    # 1280..65535 (IPv6 needs 1280), default 1500
    loss = 0.0                    # drop probability in [0, 1) at BOTH ends' ingress
    rate = "100mbit"              # rate limit of what arrives at EACH end; default none
    gso = true                    # sender UDP segmentation offload, both ends; default
                                  #   false when either end is a publisher, else true
    tx_checksum = true            # sender TX checksum offload, both ends; default true
    ipv4 = "10.1.0.0/16"          # the link's subnet; on a group link a base prefix:
    ipv6 = "fd00:1::/48"          #   member i gets its i-th /24 (IPv4) and /64 (IPv6)
    [link.at.relay]               # overrides for one end, keyed by host or group name:
    loss = 0.1                    #   drop 10% of what ARRIVES at relay on this link
    rate = "2mbit"                #   what ARRIVES at relay comes at most at 2 Mbit/s
    tx_checksum = false           #   relay sends full checksums on this link
    # ipv4 = "10.0.1.1"           #   explicit end address (not on group links)

Loss is per direction: a value set for an end applies to packets arriving at that end
(the loss program sits at the receiving interface, so the sender really loses what it
sent). `loss` on the link sets both directions; `at.<host>.loss` overrides one.
Rate limits are per direction the same way: `at.<host>.rate` limits what arrives at that
end, `rate` on the link both directions. It is realised where a qdisc can shape, at the
sending end: a TBF qdisc (root) on the PEER's interface, burst max(2 MTU-sized frames,
10 ms at the rate), latency 50 ms (packets that would wait longer are dropped, like a
router's queue). Rates are tc's units: an integer in bit/s or a string "<number><unit>",
unit bit, kbit, mbit, gbit (SI: 1000) or bps, kbps, mbps, gbps (bytes per second); 0 = no
limit (to clear a link-wide rate for one end).
Offload settings of an end apply to that end's interface as a sender.

Addresses: in a link's subnet the first host of `hosts` gets host number 1, the second
number 2 (so listing the relay first gives it .1 / ::1). Explicit end addresses override
that. Link subnets must not overlap; pool subnets skip explicit ones.

For now a topology has exactly one relay; the model itself only knows roles, so
several relays are a change to validation, not to the data model.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from relay.errors import ConfigError, NotFoundError
from relay.paths import TOPOLOGY_DIR

ROLES = ("publisher", "relay", "subscriber")
MTU_MIN, MTU_MAX, MTU_DEFAULT = 1280, 65535, 1500
DEFAULT_IPV4_POOL = "10.200.0.0/16"
DEFAULT_IPV6_POOL = "fd00:fa57::/48"
#: Per-link subnet sizes taken from pools and group base prefixes.
LINK_PREFIXLEN = {4: 24, 6: 64}
#: The most hosts one group may declare.
MAX_GROUP_COUNT = 1024

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
# No '-': keeps namespace names fr-<lab>-<host> parsable (the lab is everything before
# the last '-'). At most 15 characters: the relay names its interfaces after peers.
HOST_RE = re.compile(r"^[a-z][a-z0-9_]{0,14}$")
RESERVED_HOSTS = re.compile(r"^(lo|eth[0-9]+)$")

_TOP_FIELDS = ("name", "description", "addressing", "host", "link")
_ADDRESSING_FIELDS = ("ipv4", "ipv6")
_HOST_FIELDS = ("name", "role", "count")
_LINK_FIELDS = ("hosts", "mtu", "loss", "rate", "gso", "tx_checksum", "ipv4", "ipv6", "at")
_END_FIELDS = ("loss", "rate", "gso", "tx_checksum", "ipv4", "ipv6")

# Rate limits (tc's units): multiplier to bit/s.
RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9,
              "bps": 8, "kbps": 8 * 10**3, "mbps": 8 * 10**6, "gbps": 8 * 10**9}
RATE_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([a-z]+)$")
#: Slowest and fastest rate a TBF is given, in bit/s.
RATE_MIN, RATE_MAX = 8_000, 100 * 10**9


@dataclass(frozen=True)
class Host:
    """One host of the lab (a namespace, or a machine in a deployment)."""

    name: str
    role: str
    #: The `[[host]]` entry with `count` it was expanded from, or None.
    group: str | None = None


@dataclass(frozen=True)
class LinkEnd:
    """One end of a link: the host's interface and what it does."""

    host: str
    ipv4: IPv4Interface
    ipv6: IPv6Interface
    #: Drop probability of packets ARRIVING at this end, in [0, 1).
    loss: float
    #: UDP segmentation offload of this end's interface as a sender.
    gso: bool
    #: TX checksum offload of this end's interface as a sender.
    tx_checksum: bool
    #: Rate limit of packets ARRIVING at this end, in bit/s (a TBF on the peer's
    #: interface); 0 = none.
    rate: int = 0


@dataclass(frozen=True)
class Link:
    """A point-to-point link (a veth pair in the namespace lab)."""

    a: LinkEnd
    b: LinkEnd
    mtu: int

    @property
    def ends(self) -> tuple[LinkEnd, LinkEnd]:
        return (self.a, self.b)

    @property
    def hosts(self) -> tuple[str, str]:
        return (self.a.host, self.b.host)

    def end(self, host: str) -> LinkEnd:
        """The end of this link at `host`."""
        if host == self.a.host:
            return self.a
        if host == self.b.host:
            return self.b
        raise NotFoundError(f"link {self.a.host}–{self.b.host} does not reach host '{host}'")

    def peer(self, host: str) -> LinkEnd:
        """The end of this link opposite `host`."""
        return self.b if self.end(host) is self.a else self.a

    @property
    def label(self) -> str:
        return f"{self.a.host}–{self.b.host}"


@dataclass(frozen=True)
class Topology:
    """A validated, fully resolved topology: groups expanded, every address assigned."""

    name: str
    hosts: tuple[Host, ...]
    links: tuple[Link, ...]
    description: str = ""
    #: Where it was loaded from (a path, or a label such as '<string>').
    source: str = "<topology>"

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        names = ", ".join(h.name for h in self.hosts)
        raise NotFoundError(f"topology '{self.name}' has no host '{name}' (hosts: {names})")

    def by_role(self, role: str) -> tuple[Host, ...]:
        return tuple(h for h in self.hosts if h.role == role)

    @property
    def relay(self) -> Host:
        """The relay (validation guarantees exactly one)."""
        return self.by_role("relay")[0]

    @property
    def publishers(self) -> tuple[Host, ...]:
        return self.by_role("publisher")

    @property
    def subscribers(self) -> tuple[Host, ...]:
        return self.by_role("subscriber")

    def links_of(self, host: str) -> tuple[Link, ...]:
        """The links of `host`, in topology order."""
        self.host(host)
        return tuple(link for link in self.links if host in link.hosts)

    def link(self, host: str, peer: str) -> Link:
        """The link between two hosts."""
        for link in self.links_of(host):
            if peer in link.hosts and peer != host:
                return link
        self.host(peer)
        raise NotFoundError(f"topology '{self.name}' has no link between '{host}' and '{peer}'")

    # --- serialisation (state files) ---------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form of the resolved topology; `from_dict` reads it back."""
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "hosts": [{"name": h.name, "role": h.role, "group": h.group} for h in self.hosts],
            "links": [
                {
                    "mtu": link.mtu,
                    "ends": [
                        {
                            "host": e.host, "ipv4": str(e.ipv4), "ipv6": str(e.ipv6),
                            "loss": e.loss, "rate": e.rate, "gso": e.gso,
                            "tx_checksum": e.tx_checksum,
                        }
                        for e in link.ends
                    ],
                }
                for link in self.links
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Topology:
        """Rebuild a topology written by `to_dict` (e.g. from a lab's state file)."""
        try:
            hosts = tuple(Host(h["name"], h["role"], h.get("group")) for h in data["hosts"])
            links = tuple(
                Link(
                    *(
                        LinkEnd(e["host"], IPv4Interface(e["ipv4"]), IPv6Interface(e["ipv6"]),
                                float(e["loss"]), bool(e["gso"]), bool(e["tx_checksum"]),
                                int(e.get("rate", 0)))
                        for e in link["ends"]
                    ),
                    mtu=int(link["mtu"]),
                )
                for link in data["links"]
            )
            return cls(name=data["name"], hosts=hosts, links=links,
                       description=data.get("description", ""),
                       source=data.get("source", "<state>"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"malformed resolved topology ({type(exc).__name__}: {exc})") from None


# --- rates -----------------------------------------------------------------------------


def parse_rate(value: Any, where: str = "rate",
               fail: Callable[[str], ConfigError] = ConfigError) -> int:
    """A rate in bit/s from an integer (bit/s) or a tc-style string ("2mbit", "500kbps");
    0 means no limit."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise fail(f"{where} {value!r} must be a number of bit/s or a string such as '2mbit'")
    if isinstance(value, int):
        bits = value
    else:
        m = RATE_RE.match(value.strip().lower())
        if not m or m.group(2) not in RATE_UNITS:
            raise fail(f"{where} {value!r} is not a rate: a number and one of the units "
                       f"{', '.join(RATE_UNITS)} (e.g. '2mbit')")
        bits = round(float(m.group(1)) * RATE_UNITS[m.group(2)])
    if bits != 0 and not RATE_MIN <= bits <= RATE_MAX:
        raise fail(f"{where} {value!r} is outside {format_rate(RATE_MIN)}.."
                   f"{format_rate(RATE_MAX)} (0 = no limit)")
    return bits


def format_rate(bits: int) -> str:
    """A rate in bit/s in tc's notation, exact: 2000000 -> '2mbit'."""
    for unit in ("gbit", "mbit", "kbit"):
        if bits and bits % RATE_UNITS[unit] == 0:
            return f"{bits // RATE_UNITS[unit]}{unit}"
    return f"{bits}bit"


# --- loading ---------------------------------------------------------------------------


def available_topologies() -> list[str]:
    """Names of the topologies shipped in hw/topologies/."""
    return sorted(p.stem for p in TOPOLOGY_DIR.glob("*.toml"))


def resolve_topology_path(path_or_name: str | Path) -> Path:
    """A path as given, or hw/topologies/<name>.toml for a bare name."""
    text = str(path_or_name)
    if isinstance(path_or_name, Path) or "/" in text or text.endswith(".toml"):
        path = Path(path_or_name)
        if not path.is_file():
            raise NotFoundError(f"topology file {path} does not exist")
        return path
    path = TOPOLOGY_DIR / f"{text}.toml"
    if not path.is_file():
        names = ", ".join(available_topologies()) or "none"
        raise NotFoundError(f"no topology named '{text}' in {TOPOLOGY_DIR} (available: {names})")
    return path


def load_topology(path_or_name: str | Path) -> Topology:
    """Load and validate a topology file, or a shipped topology by name ('default')."""
    path = resolve_topology_path(path_or_name)
    return loads_topology(path.read_text(), source=str(path), default_name=path.stem)


def loads_topology(text: str, *, source: str = "<string>", default_name: str = "lab") -> Topology:
    """Parse and validate topology TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return parse_topology(data, source=source, default_name=default_name)


def parse_topology(data: Mapping[str, Any], *, source: str = "<dict>",
                   default_name: str = "lab") -> Topology:
    """Validate a topology given as the dict a TOML file parses into, and resolve it."""
    return _Parser(source).parse(data, default_name)


# --- validation and resolution ---------------------------------------------------------


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    def check_fields(self, table: Any, allowed: tuple[str, ...], where: str) -> None:
        if not isinstance(table, Mapping):
            raise self.fail(f"{where} must be a table")
        for key in table:
            if key not in allowed:
                raise self.fail(f"unknown field '{key}' in {where} (allowed: {', '.join(allowed)})")

    def parse(self, data: Mapping[str, Any], default_name: str) -> Topology:
        self.check_fields(data, _TOP_FIELDS, "the top level")
        name = data.get("name", default_name)
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise self.fail(f"name {name!r} must match {NAME_RE.pattern}")
        description = data.get("description", "")
        if not isinstance(description, str):
            raise self.fail("description must be a string")
        addressing = data.get("addressing", {})
        self.check_fields(addressing, _ADDRESSING_FIELDS, "[addressing]")
        pool4 = self.network(addressing.get("ipv4", DEFAULT_IPV4_POOL), 4, "[addressing] ipv4")
        pool6 = self.network(addressing.get("ipv6", DEFAULT_IPV6_POOL), 6, "[addressing] ipv6")

        hosts, groups = self.parse_hosts(data.get("host", []))
        links = self.parse_links(data.get("link", []), hosts, groups, pool4, pool6)
        on_link = {h for link in links for h in link.hosts}
        for host in hosts.values():
            if host.name not in on_link:
                raise self.fail(f"host '{host.name}' is on no link")
        return Topology(name=name, hosts=tuple(hosts.values()), links=tuple(links),
                        description=description, source=self.source)

    # hosts

    def parse_hosts(self, entries: Any) -> tuple[dict[str, Host], dict[str, list[str]]]:
        if not isinstance(entries, list):
            raise self.fail("'host' must be an array of tables ([[host]])")
        hosts: dict[str, Host] = {}
        groups: dict[str, list[str]] = {}
        origin: dict[str, str] = {}
        for i, entry in enumerate(entries, 1):
            where = f"[[host]] #{i}"
            self.check_fields(entry, _HOST_FIELDS, where)
            name = entry.get("name")
            if not isinstance(name, str):
                raise self.fail(f"{where} needs a name")
            where = f"host '{name}'"
            role = entry.get("role")
            if role not in ROLES:
                raise self.fail(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
            if "count" in entry:
                count = entry["count"]
                if isinstance(count, bool) or not isinstance(count, int) \
                        or not 1 <= count <= MAX_GROUP_COUNT:
                    raise self.fail(f"{where}: count must be an integer in 1..{MAX_GROUP_COUNT}")
                if name in groups or name in hosts:
                    raise self.fail(f"host name '{name}' is declared twice")
                members = [f"{name}{k}" for k in range(1, count + 1)]
                groups[name] = members
                new = [(m, Host(m, role, name)) for m in members]
                label = f"group '{name}' ({members[0]}..{members[-1]})"
            else:
                new = [(name, Host(name, role))]
                label = f"host '{name}'"
            for member, host in new:
                if not HOST_RE.match(member) or RESERVED_HOSTS.match(member):
                    raise self.fail(
                        f"host name '{member}' must match {HOST_RE.pattern} and not be lo/ethN"
                    )
                if member in hosts or member in groups:
                    raise self.fail(f"host name '{member}' is declared twice "
                                    f"({origin.get(member, 'a group')} and {label})")
                hosts[member] = host
                origin[member] = label
        relays = [h.name for h in hosts.values() if h.role == "relay"]
        if len(relays) != 1:
            raise self.fail(f"a topology needs exactly one relay host, found {len(relays)}"
                            + (f" ({', '.join(relays)})" if relays else ""))
        return hosts, groups

    # links

    def parse_links(self, entries: Any, hosts: dict[str, Host], groups: dict[str, list[str]],
                    pool4: IPv4Network, pool6: IPv6Network) -> list[Link]:
        if not isinstance(entries, list):
            raise self.fail("'link' must be an array of tables ([[link]])")
        # First pass: expand and read settings; addresses that come from pools are
        # assigned in a second pass, once every explicit subnet is known.
        pending: list[dict[str, Any]] = []
        seen_pairs: dict[frozenset[str], str] = {}
        for i, entry in enumerate(entries, 1):
            where = f"[[link]] #{i}"
            self.check_fields(entry, _LINK_FIELDS, where)
            pair = entry.get("hosts")
            if not (isinstance(pair, list) and len(pair) == 2
                    and all(isinstance(x, str) for x in pair)):
                raise self.fail(f"{where}: hosts must be a list of two host names")
            where = f"link {pair[0]}–{pair[1]}"
            for x in pair:
                if x not in hosts and x not in groups:
                    raise self.fail(f"{where}: unknown host '{x}'")
            if pair[0] == pair[1]:
                raise self.fail(f"{where}: a link needs two different hosts")
            group_names = [x for x in pair if x in groups]
            if len(group_names) > 1:
                raise self.fail(f"{where}: at most one end may be a group")
            group = group_names[0] if group_names else None
            members = groups[group] if group else [None]

            mtu = entry.get("mtu", MTU_DEFAULT)
            if isinstance(mtu, bool) or not isinstance(mtu, int) or not MTU_MIN <= mtu <= MTU_MAX:
                raise self.fail(f"{where}: mtu {mtu!r} is outside {MTU_MIN}..{MTU_MAX}")
            at = entry.get("at", {})
            self.check_fields(at, tuple(pair), f"{where} 'at' (keys are the link's hosts)")
            for key, end_table in at.items():
                self.check_fields(end_table, _END_FIELDS, f"{where} at.{key}")
                if group and key == group and ("ipv4" in end_table or "ipv6" in end_table):
                    raise self.fail(f"{where}: explicit addresses are not allowed for group "
                                    f"'{group}'; give the link a base prefix instead")
            subnets = {fam: self.link_subnet(entry, fam, where, group, len(members))
                       for fam in (4, 6)}
            for key, end_table in at.items():
                for fam in (4, 6):
                    if f"ipv{fam}" in end_table and subnets[fam] is None:
                        raise self.fail(f"{where}: at.{key} ipv{fam} needs the link's own "
                                        f"ipv{fam} subnet (pool subnets are not predictable)")

            for index, member in enumerate(members, 1):
                names = [member if x == group else x for x in pair]
                label = f"link {names[0]}–{names[1]}"
                key = frozenset(names)
                if key in seen_pairs:
                    raise self.fail(f"{label} is declared twice")
                seen_pairs[key] = label
                ends = []
                for decl, host in zip(pair, names):
                    over = at.get(decl, {})
                    ends.append({
                        "host": host,
                        "loss": self.loss(over.get("loss", entry.get("loss", 0.0)),
                                          f"{label} loss"),
                        "rate": parse_rate(over.get("rate", entry.get("rate", 0)),
                                           f"{label} rate", self.fail),
                        "gso": self.flag(over, entry, "gso", self.gso_default(hosts, names), label),
                        "tx_checksum": self.flag(over, entry, "tx_checksum", True, label),
                        "explicit": {fam: over.get(f"ipv{fam}") for fam in (4, 6)},
                    })
                link_subnets = {}
                for fam in (4, 6):
                    base = subnets[fam]
                    if base is not None and group:
                        base = self.nth_subnet(base, LINK_PREFIXLEN[fam], index)
                    link_subnets[fam] = base
                pending.append({"label": label, "mtu": mtu, "ends": ends, "subnets": link_subnets})

        self.assign_pools(pending, {4: pool4, 6: pool6})
        return [self.build_link(p) for p in pending]

    @staticmethod
    def gso_default(hosts: dict[str, Host], names: list[str]) -> bool:
        return not any(hosts[n].role == "publisher" for n in names)

    def flag(self, over: Mapping[str, Any], entry: Mapping[str, Any], key: str, default: bool,
             label: str) -> bool:
        value = over.get(key, entry.get(key, default))
        if not isinstance(value, bool):
            raise self.fail(f"{label}: {key} must be true or false, not {value!r}")
        return value

    def loss(self, value: Any, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise self.fail(f"{where} {value!r} must be a probability in [0, 1)")
        return float(value)

    def network(self, value: Any, family: int, where: str) -> Any:
        cls = IPv4Network if family == 4 else IPv6Network
        if not isinstance(value, str):
            raise self.fail(f"{where} must be a string such as "
                            f"{'10.0.1.0/24' if family == 4 else 'fd00:1::/64'}")
        try:
            return cls(value, strict=True)
        except ValueError as exc:
            raise self.fail(f"{where} {value!r} is not an IPv{family} network ({exc})") from None

    def link_subnet(self, entry: Mapping[str, Any], family: int, where: str, group: str | None,
                    count: int) -> Any:
        if f"ipv{family}" not in entry:
            return None
        net = self.network(entry[f"ipv{family}"], family, f"{where} ipv{family}")
        per_link = LINK_PREFIXLEN[family]
        if group:
            if net.prefixlen > per_link or count >= 2 ** (per_link - net.prefixlen):
                raise self.fail(f"{where} ipv{family} base {net} has no room for {count} "
                                f"/{per_link} subnets numbered 1..{count}")
        elif net.num_addresses < 4:
            raise self.fail(f"{where} ipv{family} {net} is too small (needs 2 host addresses)")
        return net

    @staticmethod
    def nth_subnet(base: Any, prefixlen: int, index: int) -> Any:
        size = 2 ** (base.max_prefixlen - prefixlen)
        first = base.network_address + index * size
        return ipaddress.ip_network(f"{first}/{prefixlen}")

    def assign_pools(self, pending: list[dict[str, Any]], pools: dict[int, Any]) -> None:
        for fam in (4, 6):
            used = [p["subnets"][fam] for p in pending if p["subnets"][fam] is not None]
            for i, x in enumerate(used):
                for y in used[i + 1:]:
                    if x.overlaps(y):
                        owners = [p["label"] for p in pending if p["subnets"][fam] in (x, y)]
                        raise self.fail(f"address clash: subnets {x} and {y} overlap "
                                        f"({' and '.join(owners)})")
            pool = pools[fam]
            per_link = LINK_PREFIXLEN[fam]
            if pool.prefixlen > per_link:
                raise self.fail(
                    f"[addressing] ipv{fam} pool {pool} is smaller than one /{per_link}")
            candidates = self.pool_subnets(pool, per_link)
            for p in pending:
                if p["subnets"][fam] is not None:
                    continue
                for subnet in candidates:
                    if not any(subnet.overlaps(u) for u in used):
                        break
                else:
                    raise self.fail(f"[addressing] ipv{fam} pool {pool} is exhausted at "
                                    f"{p['label']}; give a larger pool")
                p["subnets"][fam] = subnet
                used.append(subnet)

    @staticmethod
    def pool_subnets(pool: Any, prefixlen: int) -> Iterator[Any]:
        # Subnet 0 is skipped so the n-th link of a pool reads as 10.200.n.0/24.
        total = 2 ** (prefixlen - pool.prefixlen)
        for index in range(1, total):
            yield _Parser.nth_subnet(pool, prefixlen, index)

    def build_link(self, p: dict[str, Any]) -> Link:
        built = []
        seen: dict[Any, str] = {}
        for number, end in enumerate(p["ends"], 1):
            addrs = {}
            for fam in (4, 6):
                subnet = p["subnets"][fam]
                explicit = end["explicit"][fam]
                addrs[fam] = self.end_address(explicit, subnet, number, fam,
                                              f"{p['label']} at.{end['host']} ipv{fam}")
                if addrs[fam].ip in seen:
                    raise self.fail(f"address clash: {addrs[fam].ip} is given to both "
                                    f"{seen[addrs[fam].ip]} and {end['host']} on {p['label']}")
                seen[addrs[fam].ip] = end["host"]
            built.append(LinkEnd(end["host"], addrs[4], addrs[6], end["loss"], end["gso"],
                                 end["tx_checksum"], end["rate"]))
        return Link(built[0], built[1], mtu=p["mtu"])

    def end_address(self, explicit: Any, subnet: Any, number: int, family: int,
                    where: str) -> Any:
        iface_cls = IPv4Interface if family == 4 else IPv6Interface
        if explicit is None:
            return iface_cls(f"{subnet.network_address + number}/{subnet.prefixlen}")
        if not isinstance(explicit, str):
            raise self.fail(f"{where} must be a string")
        try:
            iface = iface_cls(explicit if "/" in explicit else f"{explicit}/{subnet.prefixlen}")
        except ValueError as exc:
            raise self.fail(f"{where} {explicit!r} is not an IPv{family} address ({exc})") from None
        if iface.network != subnet:
            raise self.fail(f"{where} {explicit} is not in the link's subnet {subnet}")
        reserved = {subnet.network_address}
        if family == 4:
            reserved.add(subnet.broadcast_address)
        if iface.ip in reserved:
            raise self.fail(f"{where} {explicit} is the subnet's network or broadcast address")
        return iface
