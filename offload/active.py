"""`fastrelay probe --active`: prove XDP modes and clsact/cls_bpf on a scratch veth pair.

Everything happens inside a freshly created network namespace with a unique name, which
is deleted in a finally block; the user's interfaces are never touched.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from offload.bcc_proofs import XDP_PROBE_FUNCTION
from relay import bpfload
from relay.errors import FastrelayError

# include/uapi/linux/if_link.h
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
#: mode name -> (attach flag, what IFLA_XDP_ATTACHED must then say, as pyroute2 names it)
XDP_MODES = {
    "native": (XDP_FLAGS_DRV_MODE, "xdp"),
    "generic": (XDP_FLAGS_SKB_MODE, "xdpgeneric"),
    "offload": (XDP_FLAGS_HW_MODE, "xdpoffload"),
}
TC_INGRESS_PARENT = "ffff:fff2"
SCRATCH_IFNAMES = ("frp0", "frp1")


@dataclass
class ActiveResult:
    namespace: str
    driver: str = "veth"
    #: mode -> "attached" or "refused: <reason>"
    xdp: dict[str, str] = field(default_factory=dict)
    clsact_cls_bpf: str = "not tried"

    def xdp_ok(self, mode: str) -> bool:
        return self.xdp.get(mode) == "attached"

    @property
    def clsact_ok(self) -> bool:
        return self.clsact_cls_bpf == "attached"


def scratch_namespace_name() -> str:
    # pid + random: two probes at once, or a leftover from a killed one, never collide.
    return f"frprobe-{os.getpid()}-{secrets.token_hex(3)}"


def _xdp_set(ipr: Any, index: int, fd: int, flags: int) -> None:
    # pyroute2 0.9.7 ignores an `xdp_flags=` keyword; the nested attribute carries the mode.
    ipr.link("set", index=index, xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]})


def _attached_mode(ipr: Any, index: int) -> str | None:
    xdp = ipr.get_links(index)[0].get_attr("IFLA_XDP")
    return None if xdp is None else xdp.get_attr("IFLA_XDP_ATTACHED")


def _try_xdp(ipr: Any, index: int, fd: int, mode: str) -> str:
    flags, expected = XDP_MODES[mode]
    try:
        _xdp_set(ipr, index, fd, flags)
    except Exception as exc:  # pyroute2 NetlinkError carries (errno, text)
        return f"refused: {getattr(exc, 'args', [None, exc])[-1]}"
    try:
        attached = _attached_mode(ipr, index)
        return "attached" if attached == expected else f"refused: kernel reports {attached!r}"
    finally:
        _xdp_set(ipr, index, -1, flags)


def run_active(default_module: Any) -> ActiveResult:
    """Attach the probe's trivial XDP and TC programs on a veth pair in a scratch netns."""
    bpfload.require_root("fastrelay probe --active")
    if default_module is None:
        raise FastrelayError("probe --active needs bcc to compile bpf/probe_features.c; "
                             "see the bcc column of the probe for why it cannot")
    from pyroute2 import IPRoute, netns

    bcc = bpfload.import_bcc()
    result = ActiveResult(namespace=scratch_namespace_name())
    xdp_fn = default_module.load_func(XDP_PROBE_FUNCTION.encode(), bcc.BPF.XDP)
    tc_fn = bpfload.load_sched_cls(default_module, "probe_sched_cls")
    netns.create(result.namespace)
    try:
        with IPRoute(netns=result.namespace) as ipr:
            a, b = SCRATCH_IFNAMES
            ipr.link("add", ifname=a, kind="veth", peer=b)
            index = ipr.link_lookup(ifname=a)[0]
            for name in SCRATCH_IFNAMES:
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
            for mode in XDP_MODES:
                result.xdp[mode] = _try_xdp(ipr, index, xdp_fn.fd, mode)
            try:
                ipr.tc("add", "clsact", index=index)
                ipr.tc("add-filter", "bpf", index=index, handle=":1", fd=tc_fn.fd, name=tc_fn.name,
                       parent=TC_INGRESS_PARENT, classid=1, direct_action=True)
                result.clsact_cls_bpf = "attached"
            except Exception as exc:
                result.clsact_cls_bpf = f"refused: {getattr(exc, 'args', [None, exc])[-1]}"
    finally:
        netns.remove(result.namespace)
    return result

