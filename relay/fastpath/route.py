"""Where the kernel must send a subscriber's copies: interface, addresses and MACs, from
netlink (the relay's socket is bound to a wildcard address, so the local address and the
interface come from the route to the peer, the next hop's MAC from the neighbour table)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from relay.errors import FastrelayError

IFF_UP = 0x1
LOOPBACK_FLAG = 0x8  # IFF_LOOPBACK
T = TypeVar("T")


@dataclass(frozen=True)
class PeerRoute:
    ifindex: int
    ifname: str
    local_address: str
    src_mac: bytes
    dst_mac: bytes


def _mac(text: str | None) -> bytes | None:
    if not text:
        return None
    return bytes(int(part, 16) for part in text.split(":"))


def _outside_event_loop(fn: Callable[[], T]) -> T:
    """pyroute2's synchronous API runs its own event loop: inside the relay's running loop
    it must run in another thread (a one-off per connection, milliseconds)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn()
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result()


def resolve(peer: str) -> PeerRoute:
    """The route from this network namespace to `peer`; FastrelayError when the fast path
    cannot reach it (loopback, no route, no neighbour entry yet)."""
    return _outside_event_loop(lambda: _resolve(peer))


def _resolve(peer: str) -> PeerRoute:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    address = ipaddress.ip_address(peer)
    if address.is_loopback:
        raise FastrelayError(f"{peer} is on the loopback interface")
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=str(address))
        except NetlinkError as exc:
            raise FastrelayError(f"no route to {peer}: {exc.args[-1]}") from None
        if not routes:
            raise FastrelayError(f"no route to {peer}")
        route = routes[0]
        ifindex = route.get_attr("RTA_OIF")
        local = route.get_attr("RTA_PREFSRC")
        gateway = route.get_attr("RTA_GATEWAY")
        links = ipr.get_links(ifindex)
        if not links:
            raise FastrelayError(f"interface {ifindex} toward {peer} is gone")
        link = links[0]
        if link["flags"] & LOOPBACK_FLAG:
            raise FastrelayError(f"{peer} is reached through loopback")
        src_mac = _mac(link.get_attr("IFLA_ADDRESS"))
        ifname = link.get_attr("IFLA_IFNAME")
        next_hop = gateway or str(address)
        dst_mac = None
        for neighbour in ipr.get_neighbours(ifindex=ifindex):
            if neighbour.get_attr("NDA_DST") == next_hop:
                dst_mac = _mac(neighbour.get_attr("NDA_LLADDR"))
                if dst_mac is not None:
                    break
    if local is None:
        raise FastrelayError(f"no source address toward {peer}")
    if src_mac is None or len(src_mac) != 6:
        raise FastrelayError(f"{ifname} has no Ethernet address")
    if dst_mac is None or len(dst_mac) != 6:
        raise FastrelayError(f"no neighbour entry for {next_hop} on {ifname} yet")
    return PeerRoute(ifindex, ifname, local, src_mac, dst_mac)


def _links() -> dict[str, Any]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME"): link for link in ipr.get_links()}


def relay_interfaces(names: list[str] | None = None) -> list[tuple[int, str]]:
    """(ifindex, name) of the interfaces to attach to: the named ones (each must exist), or
    every non-loopback interface that is up."""
    links = _outside_event_loop(_links)
    if names:
        missing = [n for n in names if n not in links]
        if missing:
            raise FastrelayError(f"no interface {', '.join(missing)} in this network namespace "
                                 f"(have: {', '.join(sorted(links))})")
        return [(links[n]["index"], n) for n in names]
    return sorted((link["index"], name) for name, link in links.items()
                  if not link["flags"] & LOOPBACK_FLAG and link["flags"] & IFF_UP)
