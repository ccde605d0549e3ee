"""hw/topology.py: loading, expansion, default addressing and strict validation (pure)."""

from __future__ import annotations

import re
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path

import pytest

from hw.topology import (
    Topology,
    available_topologies,
    format_rate,
    load_topology,
    loads_topology,
    parse_rate,
)
from relay.errors import ConfigError, NotFoundError

HOSTS = """
[[host]]
name = "pub1"
role = "publisher"
[[host]]
name = "relay"
role = "relay"
[[host]]
name = "sub"
role = "subscriber"
count = 3
"""

LINKS = """
[[link]]
hosts = ["relay", "pub1"]
[[link]]
hosts = ["relay", "sub"]
"""


def topo(text: str) -> Topology:
    return loads_topology(text, source="t.toml", default_name="t")


# --- shipped topologies ----------------------------------------------------------------


def test_default_topology_hosts_and_roles() -> None:
    t = load_topology("default")
    assert t.name == "default"
    assert [h.name for h in t.hosts] == ["pub1", "relay", "sub1", "sub2", "sub3"]
    assert t.relay.name == "relay"
    assert [h.name for h in t.publishers] == ["pub1"]
    assert [h.name for h in t.subscribers] == ["sub1", "sub2", "sub3"]
    assert {h.group for h in t.subscribers} == {"sub"}
    assert len(t.links) == 4


def test_default_topology_addresses_as_documented() -> None:
    t = load_topology("default")
    up = t.link("pub1", "relay")
    assert up.end("relay").ipv4 == IPv4Interface("10.100.0.1/24")
    assert up.end("pub1").ipv4 == IPv4Interface("10.100.0.2/24")
    sub3 = t.link("relay", "sub3")
    assert sub3.end("relay").ipv4 == IPv4Interface("10.101.3.1/24")
    assert sub3.end("sub3").ipv4 == IPv4Interface("10.101.3.2/24")
    assert sub3.end("sub3").ipv6 == IPv6Interface("fd00:fa57:101:3::2/64")


def test_default_topology_offloads_gso_off_on_publisher_link_only() -> None:
    t = load_topology("default")
    assert [e.gso for e in t.link("relay", "pub1").ends] == [False, False]
    assert all(e.gso for e in t.link("relay", "sub1").ends)
    assert all(e.tx_checksum for link in t.links for e in link.ends)
    assert all(e.loss == 0 and link.mtu == 1500 for link in t.links for e in link.ends)


def test_fanout64_has_64_subscribers_on_distinct_pool_subnets() -> None:
    t = load_topology("fanout64")
    assert len(t.subscribers) == 64 and len(t.links) == 65
    assert t.subscribers[-1].name == "sub64"
    nets4 = {link.a.ipv4.network for link in t.links}
    nets6 = {link.a.ipv6.network for link in t.links}
    assert len(nets4) == len(nets6) == 65
    assert t.link("relay", "pub1").end("relay").ipv4 == IPv4Interface("10.200.1.1/24")
    assert t.link("relay", "sub64").end("sub64").ipv4 == IPv4Interface("10.200.65.2/24")


def test_every_shipped_topology_loads() -> None:
    names = available_topologies()
    assert {"default", "fanout64"} <= set(names)
    for name in names:
        load_topology(name)


def test_load_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(HOSTS + LINKS)
    t = load_topology(path)
    assert t.name == "mine" and t.source == str(path)
    assert load_topology(str(path)) == t


def test_unknown_topology_name_lists_available() -> None:
    with pytest.raises(NotFoundError, match=r"no topology named 'nope' .*available: .*default"):
        load_topology("nope")


def test_missing_topology_file() -> None:
    with pytest.raises(NotFoundError, match=r"topology file /nonexistent/x.toml does not exist"):
        load_topology("/nonexistent/x.toml")


def test_round_trip_through_dict() -> None:
    t = load_topology("default")
    assert Topology.from_dict(t.to_dict()) == t


# --- expansion, addressing, per-end settings --------------------------------------------


def test_group_base_prefix_gives_member_i_its_ith_subnet() -> None:
    t = topo(HOSTS + """
[[link]]
hosts = ["relay", "pub1"]
[[link]]
hosts = ["sub", "relay"]
ipv4 = "10.9.0.0/16"
ipv6 = "fd09::/48"
""")
    link = t.link("sub2", "relay")
    assert link.a.host == "sub2"  # order of `hosts` decides host numbers
    assert link.end("sub2").ipv4 == IPv4Interface("10.9.2.1/24")
    assert link.end("relay").ipv4 == IPv4Interface("10.9.2.2/24")
    assert link.end("relay").ipv6 == IPv6Interface("fd09:0:0:2::2/64")


def test_pool_skips_explicit_subnets_and_subnet_zero() -> None:
    t = topo(HOSTS + """
[addressing]
ipv4 = "10.50.0.0/16"
ipv6 = "fd50::/48"
[[link]]
hosts = ["relay", "pub1"]
ipv4 = "10.50.2.0/24"
[[link]]
hosts = ["relay", "sub"]
""")
    assert t.link("relay", "pub1").a.ipv4.network.with_prefixlen == "10.50.2.0/24"
    assert t.link("relay", "pub1").a.ipv6.network.with_prefixlen == "fd50:0:0:1::/64"
    assert [t.link("relay", f"sub{i}").a.ipv4.network.with_prefixlen for i in (1, 2, 3)] == [
        "10.50.1.0/24", "10.50.3.0/24", "10.50.4.0/24"]


def test_loss_both_directions_and_per_end_override() -> None:
    t = topo(HOSTS + """
[[link]]
hosts = ["relay", "pub1"]
loss = 0.01
at.relay.loss = 0.1
[[link]]
hosts = ["relay", "sub"]
at.sub.loss = 0.2
""")
    up = t.link("relay", "pub1")
    assert (up.end("relay").loss, up.end("pub1").loss) == (0.1, 0.01)
    down = t.link("relay", "sub3")
    assert (down.end("relay").loss, down.end("sub3").loss) == (0.0, 0.2)


def test_rate_limits_what_arrives_link_wide_and_per_end() -> None:
    t = topo(HOSTS + """
[[link]]
hosts = ["relay", "pub1"]
rate = "100mbit"
at.pub1.rate = 0
[[link]]
hosts = ["relay", "sub"]
at.sub.rate = "2mbit"
""")
    up = t.link("relay", "pub1")
    assert (up.end("relay").rate, up.end("pub1").rate) == (100_000_000, 0)
    down = t.link("relay", "sub2")
    assert (down.end("relay").rate, down.end("sub2").rate) == (0, 2_000_000)
    assert Topology.from_dict(t.to_dict()) == t


def test_default_topology_has_no_rate_limit() -> None:
    t = load_topology("default")
    assert all(end.rate == 0 for link in t.links for end in link.ends)


@pytest.mark.parametrize(("value", "bits"), [
    ("2mbit", 2_000_000), ("500kbit", 500_000), ("1gbit", 10**9), ("1.5mbit", 1_500_000),
    ("64000bit", 64_000), ("100kbps", 800_000), ("2mbps", 16_000_000), ("2MBit", 2_000_000),
    ("2 mbit", 2_000_000), (8000, 8000), (0, 0), ("0mbit", 0),
])
def test_parse_rate_tc_units(value: object, bits: int) -> None:
    assert parse_rate(value) == bits


def test_format_rate_is_exact_tc_notation() -> None:
    assert [format_rate(b) for b in (2_000_000, 1_500_000, 10**9, 8001)] == [
        "2mbit", "1500kbit", "1gbit", "8001bit"]
    assert all(parse_rate(format_rate(b)) == b for b in (2_000_000, 1_500_000, 8001))


def test_offload_settings_link_wide_and_per_end() -> None:
    t = topo(HOSTS + """
[[link]]
hosts = ["relay", "pub1"]
gso = true
at.pub1.gso = false
[[link]]
hosts = ["relay", "sub"]
tx_checksum = false
at.sub.tx_checksum = true
""")
    up = t.link("relay", "pub1")
    assert (up.end("relay").gso, up.end("pub1").gso) == (True, False)
    down = t.link("relay", "sub1")
    assert (down.end("relay").tx_checksum, down.end("sub1").tx_checksum) == (False, True)


def test_explicit_end_addresses_and_mtu() -> None:
    t = topo(HOSTS + """
[[link]]
hosts = ["relay", "pub1"]
mtu = 9000
ipv4 = "192.168.7.0/24"
ipv6 = "fd07::/64"
at.pub1.ipv4 = "192.168.7.100"
at.relay.ipv6 = "fd07::aa/64"
[[link]]
hosts = ["relay", "sub"]
""")
    up = t.link("relay", "pub1")
    assert up.mtu == 9000
    assert up.end("pub1").ipv4 == IPv4Interface("192.168.7.100/24")
    assert up.end("relay").ipv4 == IPv4Interface("192.168.7.1/24")
    assert up.end("relay").ipv6 == IPv6Interface("fd07::aa/64")


def test_lookup_errors_name_what_is_missing() -> None:
    t = load_topology("default")
    with pytest.raises(NotFoundError, match=r"no host 'sub9' \(hosts: pub1, relay, sub1"):
        t.host("sub9")
    with pytest.raises(NotFoundError, match=r"no link between 'sub1' and 'pub1'"):
        t.link("sub1", "pub1")


# --- strict validation -------------------------------------------------------------------

BAD = [
    ("unknown top-level field", "colour = 1\n" + HOSTS + LINKS,
     r"unknown field 'colour' in the top level \(allowed: name, description"),
    ("unknown host field", HOSTS.replace('role = "relay"', 'role = "relay"\nip = "x"') + LINKS,
     r"unknown field 'ip' in \[\[host\]\] #2"),
    ("unknown link field",
     HOSTS + LINKS.replace('["relay", "pub1"]', '["relay", "pub1"]\nlatency = 3'),
     r"unknown field 'latency' in \[\[link\]\] #1"),
    ("unknown per-end field", HOSTS + LINKS + 'at.relay.mtu = 1400\n',
     r"unknown field 'mtu' in link relay–sub at.relay"),
    ("per-end key not on the link", HOSTS + LINKS + 'at.pub1.loss = 0.1\n',
     r"unknown field 'pub1' in link relay–sub 'at'"),
    ("unknown addressing field", "[addressing]\nipv5 = 'x'\n" + HOSTS + LINKS,
     r"unknown field 'ipv5' in \[addressing\]"),
    ("link to unknown host", HOSTS + LINKS.replace('"pub1"]', '"pub9"]'),
     r"link relay–pub9: unknown host 'pub9'"),
    ("link to itself", HOSTS + LINKS + '[[link]]\nhosts = ["pub1", "pub1"]\n',
     r"a link needs two different hosts"),
    ("link with one host", HOSTS + '[[link]]\nhosts = ["relay"]\n',
     r"hosts must be a list of two host names"),
    ("duplicate link", HOSTS + LINKS + '[[link]]\nhosts = ["pub1", "relay"]\n',
     r"link pub1–relay is declared twice"),
    ("link between two groups", HOSTS + '[[host]]\nname = "p"\nrole = "publisher"\ncount = 2\n'
     + LINKS + '[[link]]\nhosts = ["p", "sub"]\n', r"at most one end may be a group"),
    ("host on no link", HOSTS + '[[link]]\nhosts = ["relay", "pub1"]\n',
     r"host 'sub1' is on no link"),
    ("no relay", HOSTS.replace('"relay"\n', '"subscriber"\n', 1).replace(
        'role = "relay"', 'role = "subscriber"'), r"exactly one relay host, found 0"),
    ("two relays", HOSTS + '[[host]]\nname = "relay2"\nrole = "relay"\n' + LINKS,
     r"exactly one relay host, found 2 \(relay, relay2\)"),
    ("relay group",
     HOSTS.replace('name = "relay"\nrole = "relay"', 'name = "r"\nrole = "relay"\ncount = 2'),
     r"exactly one relay host, found 2"),
    ("unknown role", HOSTS.replace('"publisher"', '"source"') + LINKS,
     r"host 'pub1': role 'source' is not one of publisher, relay, subscriber"),
    ("duplicate host from group", HOSTS + '[[host]]\nname = "sub2"\nrole = "subscriber"\n' + LINKS,
     r"host name 'sub2' is declared twice \(group 'sub' \(sub1..sub3\) and host 'sub2'\)"),
    ("host name with dash", HOSTS.replace('"pub1"', '"pub-1"', 1) + LINKS,
     r"host name 'pub-1' must match"),
    ("host name too long", HOSTS.replace('"pub1"', '"publisher_number1"', 1) + LINKS,
     r"host name 'publisher_number1' must match"),
    ("reserved host name", HOSTS.replace('"pub1"', '"lo"', 1) + LINKS,
     r"host name 'lo' must match"),
    ("bad count", HOSTS.replace("count = 3", "count = 0") + LINKS,
     r"count must be an integer in 1..1024"),
    ("mtu too small", HOSTS + LINKS + "mtu = 1000\n", r"mtu 1000 is outside 1280..65535"),
    ("mtu too large", HOSTS + LINKS + "mtu = 70000\n", r"mtu 70000 is outside 1280..65535"),
    ("mtu not a number", HOSTS + LINKS + 'mtu = "big"\n', r"mtu 'big' is outside"),
    ("loss of one", HOSTS + LINKS + "loss = 1.0\n", r"loss 1.0 must be a probability in \[0, 1\)"),
    ("negative loss", HOSTS + LINKS + "at.relay.loss = -0.1\n", r"loss -0.1 must be a probability"),
    ("boolean loss", HOSTS + LINKS + "loss = true\n", r"loss True must be a probability"),
    ("gso not a boolean", HOSTS + LINKS + "gso = 1\n", r"gso must be true or false, not 1"),
    ("rate without a unit", HOSTS + LINKS + 'rate = "2"\n',
     r"link relay–sub1 rate '2' is not a rate: a number and one of the units bit, kbit"),
    ("rate with an unknown unit", HOSTS + LINKS + 'at.sub.rate = "2mb"\n',
     r"link relay–sub1 rate '2mb' is not a rate"),
    ("rate too low", HOSTS + LINKS + 'at.relay.rate = "1kbit"\n',
     r"rate '1kbit' is outside 8kbit..100gbit \(0 = no limit\)"),
    ("negative rate", HOSTS + LINKS + "rate = -5\n", r"rate -5 is outside 8kbit"),
    ("boolean rate", HOSTS + LINKS + "rate = true\n",
     r"rate True must be a number of bit/s or a string such as '2mbit'"),
    ("float rate", HOSTS + LINKS + "rate = 2.5\n", r"rate 2.5 must be a number of bit/s"),
    ("overlapping subnets", HOSTS + """
[[link]]
hosts = ["relay", "pub1"]
ipv4 = "10.0.2.0/24"
[[link]]
hosts = ["relay", "sub"]
ipv4 = "10.0.0.0/16"
""", r"address clash: subnets 10.0.2.0/24 and 10.0.2.0/24 overlap "
    r"\(link relay–pub1 and link relay–sub2"),
    ("same address at both ends", HOSTS + """
[[link]]
hosts = ["relay", "pub1"]
ipv4 = "10.1.0.0/24"
at.pub1.ipv4 = "10.1.0.1"
[[link]]
hosts = ["relay", "sub"]
""", r"address clash: 10.1.0.1 is given to both relay and pub1"),
    ("address outside the subnet", HOSTS + """
[[link]]
hosts = ["relay", "pub1"]
ipv4 = "10.1.0.0/24"
at.pub1.ipv4 = "10.2.0.5"
[[link]]
hosts = ["relay", "sub"]
""", r"10.2.0.5 is not in the link's subnet 10.1.0.0/24"),
    ("broadcast address", HOSTS + """
[[link]]
hosts = ["relay", "pub1"]
ipv4 = "10.1.0.0/24"
at.pub1.ipv4 = "10.1.0.255"
[[link]]
hosts = ["relay", "sub"]
""", r"10.1.0.255 is the subnet's network or broadcast address"),
    ("end address without a link subnet", HOSTS + LINKS.replace(
        '["relay", "pub1"]', '["relay", "pub1"]\nat.pub1.ipv6 = "fd00::5"'),
     r"at.pub1 ipv6 needs the link's own ipv6 subnet"),
    ("subnet with host bits", HOSTS + LINKS + 'ipv4 = "10.1.2.3/16"\n',
     r"ipv4 '10.1.2.3/16' is not an IPv4 network"),
    ("IPv6 subnet given as ipv4", HOSTS + LINKS + 'ipv4 = "fd00::/48"\n',
     r"is not an IPv4 network"),
    ("group explicit address", HOSTS + LINKS + 'ipv4 = "10.1.0.0/16"\nat.sub.ipv4 = "10.1.1.9"\n',
     r"explicit addresses are not allowed for group 'sub'"),
    ("group base too small", HOSTS + LINKS + 'ipv4 = "10.1.0.0/23"\n',
     r"base 10.1.0.0/23 has no room for 3 /24 subnets"),
    ("pool exhausted", "[addressing]\nipv4 = '10.1.0.0/23'\n" + HOSTS + LINKS,
     r"\[addressing\] ipv4 pool 10.1.0.0/23 is exhausted at link relay–sub1"),
    ("bad topology name", 'name = "My Lab"\n' + HOSTS + LINKS, r"name 'My Lab' must match"),
    ("not TOML", "[[host]\n", r"not valid TOML"),
    ("host is not an array", 'host = "pub1"\n' + LINKS, r"'host' must be an array of tables"),
]


@pytest.mark.parametrize("text,message", [(t, m) for _, t, m in BAD], ids=[d for d, _, _ in BAD])
def test_bad_topology_is_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        topo(text)
    text_of_error = str(info.value)
    assert text_of_error.startswith("t.toml: "), text_of_error
    assert "\n" not in text_of_error
    assert re.search(message, text_of_error), text_of_error


def test_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("speed = 1\n" + HOSTS + LINKS)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: unknown field 'speed'"):
        load_topology(path)
