"""What is known about drivers without touching them: XDP modes, vendors, crypto offload.

These tables come from the upstream drivers (kernel 6.x) and notes/toolchain.md §10.
They say what a driver is *known* to offer; `fastrelay probe --active` proves XDP modes
on a scratch veth, and nothing here is proof for a particular card or firmware.
"""

from __future__ import annotations

NFP_DRIVER = "nfp"
NFP_VENDOR = "0x19ee"  # Netronome Systems

#: PCI vendor ids the probe names in its messages.
VENDOR_NAMES = {
    "0x19ee": "Netronome",
    "0x1af4": "Red Hat (virtio)",
    "0x8086": "Intel",
    "0x15b3": "Mellanox/NVIDIA",
    "0x14e4": "Broadcom",
    "0x1d0f": "Amazon",
    "0x1924": "Solarflare/AMD",
    "0x177d": "Cavium/Marvell",
}

#: 'generic' (skb mode) works on every interface; 'native' needs the driver's ndo_bpf;
#: 'offload' (XDP_FLAGS_HW_MODE) exists only in nfp and netdevsim.
DRIVER_XDP_MODES: dict[str, tuple[str, ...]] = {
    "nfp": ("native", "generic", "offload"),
    "netdevsim": ("native", "generic", "offload"),
    "veth": ("native", "generic"),
    "virtio_net": ("native", "generic"),
    "tun": ("native", "generic"),
    "mlx5_core": ("native", "generic"),
    "mlx4_en": ("native", "generic"),
    "mlx4_core": ("native", "generic"),
    "i40e": ("native", "generic"),
    "ice": ("native", "generic"),
    "ixgbe": ("native", "generic"),
    "ixgbevf": ("native", "generic"),
    "igb": ("native", "generic"),
    "igc": ("native", "generic"),
    "bnxt_en": ("native", "generic"),
    "ena": ("native", "generic"),
    "qede": ("native", "generic"),
    "sfc": ("native", "generic"),
    "mvneta": ("native", "generic"),
    "stmmac": ("native", "generic"),
}
GENERIC_ONLY: tuple[str, ...] = ("generic",)

#: What each driver offers the TC/XDP data plane in hardware, in words, for the report.
DRIVER_OFFLOAD_NOTES = {
    "nfp": "eBPF offload of XDP (xdpoffload) and cls_bpf (skip_sw) with the BPF firmware; "
           "kTLS and IPsec crypto offload with the crypto firmware; offloaded programs "
           "cannot call bpf_clone_redirect, redirect, tail calls or kfuncs (toolchain.md §10)",
    "netdevsim": "software model of eBPF offload, no real NIC",
}

#: Drivers that can encrypt and decrypt QUIC 1-RTT packets with keys pushed from the host.
#: No mainline driver does (kTLS and IPsec offloads do not apply to QUIC), so this is empty;
#: a driver enters it only after the `nic` backend is proven on its hardware.
QUIC_CRYPTO_OFFLOAD_DRIVERS: frozenset[str] = frozenset()


def xdp_modes_for(driver: str | None) -> tuple[str, ...]:
    return DRIVER_XDP_MODES.get(driver or "", GENERIC_ONLY)


def vendor_name(vendor: str | None) -> str | None:
    return VENDOR_NAMES.get((vendor or "").lower())


def is_nfp(driver: str | None, vendor: str | None) -> bool:
    """Either sign is enough: the driver bound, or a Netronome function with no driver yet."""
    return driver == NFP_DRIVER or (vendor or "").lower() == NFP_VENDOR
