"""Readers of procfs and sysfs that take a root path, so a recorded tree reads like a host.

Every reader returns None (or an empty result) for what the tree does not hold, and never
raises for a missing file: a missing fact is reported, not fatal. Recorded trees use
relative symlinks (as sysfs itself does), so resolving a link never leaves the tree.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

#: Bytes read at most from one sysfs/procfs file: these are small; a bound keeps a bad
#: tree (a symlink to /dev/zero, say) from hanging the probe.
MAX_FILE_BYTES = 1 << 20
#: /proc/kallsyms is ~5 MB on a distribution kernel; read it whole, but not more.
MAX_KALLSYMS_BYTES = 64 << 20
#: Network interfaces listed at most (a host with thousands of VFs stays readable).
MAX_INTERFACES = 1024


def _p(root: Path, rel: str) -> Path:
    return root / rel.lstrip("/")


def read_text(root: Path, rel: str, *, limit: int = MAX_FILE_BYTES) -> str | None:
    """The text of root/rel, or None when it is absent or unreadable."""
    try:
        with open(_p(root, rel), "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None


def read_line(root: Path, rel: str) -> str | None:
    text = read_text(root, rel)
    if text is None:
        return None
    return text.strip().splitlines()[0].strip() if text.strip() else ""


def kernel_release(root: Path) -> str | None:
    """`uname -r` of the tree: osrelease, else the third word of /proc/version."""
    release = read_line(root, "proc/sys/kernel/osrelease")
    if release:
        return release
    version = read_line(root, "proc/version")
    if version:
        words = version.split()
        if len(words) >= 3 and words[:2] == ["Linux", "version"]:
            return words[2]
    return None


def kernel_version_tuple(release: str | None) -> tuple[int, int] | None:
    """'6.18.44-fc-v669' -> (6, 18)."""
    if not release:
        return None
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else None


def jit_enable(root: Path) -> int | None:
    """net.core.bpf_jit_enable: 0 off, 1 on, 2 on with debug output; None if absent."""
    value = read_line(root, "proc/sys/net/core/bpf_jit_enable")
    try:
        return int(value) if value else None
    except ValueError:
        return None


def btf_vmlinux(root: Path) -> bool:
    return _p(root, "sys/kernel/btf/vmlinux").exists()


def bpffs_mounts(root: Path) -> list[str]:
    """Mount points of type bpf in /proc/mounts (the relay pins maps there)."""
    text = read_text(root, "proc/mounts") or ""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "bpf":
            mounts.append(fields[1])
    return mounts


@dataclass(frozen=True)
class Kallsyms:
    """Which of the asked-for symbols the kernel exports; `readable` False means 'cannot tell'."""

    readable: bool
    found: frozenset[str]


def kallsyms(root: Path, names: set[str] | frozenset[str]) -> Kallsyms:
    """Look names up in /proc/kallsyms (names are readable without root; addresses are not)."""
    text = read_text(root, "proc/kallsyms", limit=MAX_KALLSYMS_BYTES)
    if text is None:
        return Kallsyms(False, frozenset())
    found = set()
    for line in text.splitlines():
        fields = line.split()
        # "<addr> <type> <name> [module]"
        if len(fields) >= 3 and fields[2] in names:
            found.add(fields[2])
    return Kallsyms(True, frozenset(found))


@dataclass(frozen=True)
class KernelConfig:
    source: str | None  # which file the options came from, None if none was found
    options: dict[str, str]

    def get(self, option: str) -> str | None:
        """'y', 'm', a value, 'n' (explicitly unset), or None when the config does not say."""
        if self.source is None:
            return None
        return self.options.get(option, "n")


def parse_kernel_config(text: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"# (CONFIG_\w+) is not set$", line)
        if m:
            options[m.group(1)] = "n"
            continue
        m = re.match(r"(CONFIG_\w+)=(.*)$", line)
        if m:
            options[m.group(1)] = m.group(2).strip('"')
    return options


def kernel_config(root: Path, release: str | None) -> KernelConfig:
    """/proc/config.gz (CONFIG_IKCONFIG_PROC) or the distribution's /boot/config-<release>."""
    gz = _p(root, "proc/config.gz")
    if gz.is_file():
        try:
            with gzip.open(gz, "rb") as f:
                return KernelConfig("/proc/config.gz",
                                    parse_kernel_config(f.read(MAX_FILE_BYTES * 8).decode()))
        except (OSError, EOFError):
            pass
    if release:
        text = read_text(root, f"boot/config-{release}", limit=MAX_FILE_BYTES * 8)
        if text is not None:
            return KernelConfig(f"/boot/config-{release}", parse_kernel_config(text))
    return KernelConfig(None, {})


@dataclass(frozen=True)
class CryptoAlg:
    """One entry of /proc/crypto."""

    name: str
    driver: str
    type: str
    priority: int


def parse_proc_crypto(text: str) -> list[CryptoAlg]:
    algs: list[CryptoAlg] = []
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "name" in fields:
            try:
                priority = int(fields.get("priority", "0"))
            except ValueError:
                priority = 0
            algs.append(CryptoAlg(fields["name"], fields.get("driver", ""),
                                  fields.get("type", ""), priority))
    return algs


def crypto_algorithms(root: Path) -> list[CryptoAlg] | None:
    text = read_text(root, "proc/crypto")
    return None if text is None else parse_proc_crypto(text)


@dataclass(frozen=True)
class SysfsInterface:
    """What /sys/class/net/<name> tells about one interface."""

    name: str
    driver: str | None       # basename of device/driver; None for virtual devices
    bus: str | None          # basename of device/subsystem: pci, virtio, ...
    pci_vendor: str | None   # '0x19ee'; for virtio devices, the PCI function's vendor
    pci_device: str | None
    pci_address: str | None  # '0000:04:00.0'
    virtual: bool            # no device/ link: veth, lo, ifb, bridges ...
    phys_port_name: str | None


def _link_basename(path: Path) -> str | None:
    if not path.is_symlink() and not path.exists():
        return None
    try:
        return Path(os.path.realpath(path)).name
    except OSError:
        return None


def _pci_function(device: Path) -> Path | None:
    """The PCI function a netdev's device sits on: itself (nfp, igb) or a parent (virtio)."""
    here = Path(os.path.realpath(device))
    for _ in range(4):  # virtioN -> 0000:00:03.0 is one level; bound the walk
        if re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]", here.name):
            return here
        if here.parent == here:
            break
        here = here.parent
    return None


def list_interfaces(root: Path) -> list[SysfsInterface]:
    net = _p(root, "sys/class/net")
    try:
        names = sorted(p.name for p in net.iterdir())[:MAX_INTERFACES]
    except OSError:
        return []
    result = []
    for name in names:
        base = net / name
        if not base.is_dir():
            continue  # bonding_masters and other non-interface files
        device = base / "device"
        virtual = not device.exists()
        pci = None if virtual else _pci_function(device)
        vendor = None if virtual else _read_abs(device / "vendor")
        dev_id = None if virtual else _read_abs(device / "device")
        if pci is not None:
            # virtio's own 'vendor' is the virtio subsystem vendor; the PCI function's is what
            # identifies the card, and for PCI NICs the two files are the same.
            vendor = _read_abs(pci / "vendor") or vendor
            dev_id = _read_abs(pci / "device") or dev_id
        result.append(SysfsInterface(
            name=name,
            driver=None if virtual else _link_basename(device / "driver"),
            bus=None if virtual else _link_basename(device / "subsystem"),
            pci_vendor=vendor,
            pci_device=dev_id,
            pci_address=pci.name if pci is not None else None,
            virtual=virtual,
            phys_port_name=read_line(root, f"sys/class/net/{name}/phys_port_name") or None,
        ))
    return result


def _read_abs(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(256).decode().strip() or None
    except OSError:
        return None


def pci_driver_registered(root: Path, driver: str) -> bool:
    """/sys/bus/pci/drivers/<driver> exists once the driver is registered (built in or loaded)."""
    return _p(root, f"sys/bus/pci/drivers/{driver}").is_dir()
