"""The offload capability probe: what the kernel supports, what bcc can use of it, what the
NICs offer, and a verdict per crypto backend (`none`, `soft`, `nic`).

The relay calls `require_backend(name)` at start; `fastrelay probe` prints the report.
Kernel support is read from the (possibly recorded) tree: kallsyms, kernel config, kernel
version. bcc support is only ever taken from real compile+load attempts on the live
machine (offload/bcc_proofs.py); on a recorded tree it is reported as not probed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from offload import sysfs
from offload.active import ActiveResult, run_active
from offload.bcc_proofs import BccProofs, Proof, not_probed, run_bcc_proofs
from offload.ethtool import OFFLOAD_FEATURES, ethtool_outputs, parse_driver_info, parse_features
from offload.knowledge import (
    DRIVER_OFFLOAD_NOTES,
    QUIC_CRYPTO_OFFLOAD_DRIVERS,
    is_nfp,
    vendor_name,
    xdp_modes_for,
)
from relay.bpfload import require_root
from relay.errors import ConfigError, MissingCapabilityError, NotFoundError

BACKENDS = ("none", "soft", "nic")
ARPHRD_LOOPBACK = "772"

#: The kernel's BPF crypto API (6.10+): kfuncs a libbpf-loaded program could call.
CRYPTO_KFUNCS = ("bpf_crypto_ctx_create", "bpf_crypto_ctx_acquire", "bpf_crypto_ctx_release",
                 "bpf_crypto_encrypt", "bpf_crypto_decrypt")
#: QUIC's AEADs as /proc/crypto names them (kernel-internal; BPF cannot reach AEADs).
QUIC_AEADS = {"aes-128-gcm": "gcm(aes)", "chacha20-poly1305": "rfc7539(chacha20,poly1305)"}


@dataclass(frozen=True)
class KernelSign:
    """Where kernel support for a feature shows: exported symbols, config options, version."""

    symbols: tuple[str, ...] = ()
    config: tuple[str, ...] = ()
    since: tuple[int, int] | None = None


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    label: str
    kernel: KernelSign
    proof: str | None  # a bcc_proofs feature, "active" (--active), or None (kernel only)


FEATURE_SPECS: tuple[FeatureSpec, ...] = (
    FeatureSpec("bpf_syscall", "BPF syscall", KernelSign(("__sys_bpf",), ("CONFIG_BPF_SYSCALL",)),
                "sched_cls"),
    FeatureSpec("clsact", "clsact qdisc", KernelSign(("clsact_init",), ("CONFIG_NET_SCH_INGRESS",)),
                "active"),
    FeatureSpec("cls_bpf", "cls_bpf classifier",
                KernelSign(("cls_bpf_classify",), ("CONFIG_NET_CLS_BPF",)), "active"),
    FeatureSpec("sched_cls", "TC (SCHED_CLS) programs",
                KernelSign(("tc_cls_act_func_proto",), ("CONFIG_NET_CLS_ACT",)), "sched_cls"),
    FeatureSpec("clone_redirect", "bpf_clone_redirect", KernelSign(("bpf_clone_redirect",)),
                "clone_redirect"),
    FeatureSpec("ringbuf", "ring buffer", KernelSign(("bpf_ringbuf_output",), since=(5, 8)),
                "ringbuf"),
    FeatureSpec("atomics", "atomic fetch-and-add", KernelSign(since=(5, 12)), "atomics"),
    FeatureSpec("spin_lock", "bpf_spin_lock", KernelSign(("bpf_spin_lock",), since=(5, 1)),
                "spin_lock"),
    FeatureSpec("bounded_loops", "bounded loops", KernelSign(since=(5, 3)), "bounded_loops"),
    FeatureSpec("percpu_array", "per-CPU array",
                KernelSign(("percpu_array_map_lookup_elem",), since=(4, 6)), "percpu_array"),
    FeatureSpec("bpf_loop", "bpf_loop helper", KernelSign(("bpf_loop",), since=(5, 17)),
                "bpf_loop"),
    FeatureSpec("kfunc_call", "kfunc calls (BPF crypto API)",
                KernelSign(("bpf_crypto_ctx_create",), since=(6, 10)), "kfunc_call"),
    FeatureSpec("jit", "JIT", KernelSign(config=("CONFIG_BPF_JIT",)), None),
    FeatureSpec("btf", "BTF (/sys/kernel/btf/vmlinux)", KernelSign(config=("CONFIG_DEBUG_INFO_BTF",)),
                None),
)

#: What each backend needs. nic runs the same fast path as none, with the NIC on top.
BACKEND_KERNEL_NEEDS = {
    "none": ("bpf_syscall", "clsact", "cls_bpf"),
    "soft": ("bpf_syscall", "clsact", "cls_bpf"),
    "nic": ("bpf_syscall", "clsact", "cls_bpf"),
}
BACKEND_BCC_NEEDS = {
    "none": ("sched_cls", "clone_redirect", "ringbuf", "atomics"),
    # soft's ChaCha20-Poly1305 is plain eBPF: loops over blocks and per-CPU scratch, no kfuncs
    "soft": ("sched_cls", "clone_redirect", "ringbuf", "atomics", "bounded_loops", "percpu_array"),
    "nic": ("sched_cls", "clone_redirect", "ringbuf", "atomics"),
}


# --- the report ----------------------------------------------------------------------


@dataclass(frozen=True)
class Feature:
    name: str
    label: str
    kernel: bool | None  # None: this tree does not say
    kernel_evidence: str
    bcc: bool | None     # None: not probed, or not a bcc matter
    bcc_detail: str


@dataclass(frozen=True)
class KernelInfo:
    release: str | None
    version: str | None  # first line of /proc/version
    jit: str             # "on", "on (debug output)", "off", "unknown"
    btf: bool
    bpffs: list[str]     # bpf mount points; the relay pins maps in one
    config_source: str | None
    kallsyms_readable: bool


@dataclass(frozen=True)
class CryptoInfo:
    kfuncs: dict[str, bool | None]   # kernel side; None when kallsyms cannot be read
    kfuncs_usable_by_bcc: bool | None
    kfuncs_bcc_detail: str
    bpf_crypto_ciphers: list[str]    # lskcipher algorithms, what bpf_crypto_ctx_create can open
    quic_aeads: dict[str, bool]      # registered in the kernel (not reachable from BPF)
    algorithms: list[sysfs.CryptoAlg]


@dataclass(frozen=True)
class Interface:
    name: str
    driver: str | None
    kind: str                    # "pci", "virtio", ..., "virtual" or "loopback"
    pci_vendor: str | None
    vendor_name: str | None
    pci_device: str | None
    pci_address: str | None
    firmware: str | None
    xdp_modes_known: list[str]   # from the driver table, not proven
    offload_features: dict[str, str]  # ethtool -k name -> "on" / "off [fixed]"
    is_nfp: bool
    notes: list[str]


@dataclass(frozen=True)
class NfpInfo:
    driver_registered: bool      # /sys/bus/pci/drivers/nfp
    interfaces: list[str]
    offload_modes: list[str]
    verified_on_hardware: bool   # always False until someone runs fastrelay on one


@dataclass(frozen=True)
class BackendVerdict:
    name: str
    usable: bool
    reasons: list[str]           # why not (empty when usable)
    basis: list[str]             # what was proven or read
    verified_on_hardware: bool | None = None  # only meaningful for `nic`


@dataclass(frozen=True)
class ProbeReport:
    root: str
    recorded: bool
    kernel: KernelInfo
    features: list[Feature]
    crypto: CryptoInfo
    interfaces: list[Interface]
    nfp: NfpInfo
    active: ActiveResult | None
    backends: list[BackendVerdict] = field(default_factory=list)

    def feature(self, name: str) -> Feature:
        return next(f for f in self.features if f.name == name)

    def backend(self, name: str) -> BackendVerdict:
        return next(b for b in self.backends if b.name == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- kernel side ---------------------------------------------------------------------


def kernel_support(sign: KernelSign, syms: sysfs.Kallsyms, config: sysfs.KernelConfig,
                   version: tuple[int, int] | None) -> tuple[bool | None, str]:
    """Strongest evidence first: an exported symbol, then the config, then the version."""
    if sign.symbols and syms.readable:
        hits = [s for s in sign.symbols if s in syms.found]
        if hits:
            return True, f"kallsyms: {hits[0]}"
        return False, f"{sign.symbols[0]} not in kallsyms"
    for option in sign.config:
        value = config.get(option)
        if value is not None:
            if value == "n":
                return False, f"{option} is not set ({config.source})"
            return True, f"{option}={value}"
    if sign.since and version:
        need = ".".join(map(str, sign.since))
        if version >= sign.since:
            return True, f"kernel >= {need}"
        return False, f"kernel {version[0]}.{version[1]} < {need}"
    return None, "this tree does not say"


def _jit_state(value: int | None) -> str:
    return {None: "unknown", 0: "off", 1: "on", 2: "on (debug output)"}.get(value, f"mode {value}")


def _bcc_cell(spec: FeatureSpec, proofs: dict[str, Proof], active: ActiveResult | None,
              recorded: bool) -> tuple[bool | None, str]:
    if spec.proof is None:
        return None, "kernel only"
    if spec.proof == "active":
        if active is None:
            reason = "recorded tree" if recorded else "prove with --active (scratch veth)"
            return None, f"not probed: {reason}"
        return active.clsact_ok, f"{active.clsact_cls_bpf} on a scratch veth"
    proof = proofs[spec.proof]
    return proof.ok, proof.detail


def build_features(root: Path, syms: sysfs.Kallsyms, config: sysfs.KernelConfig,
                   version: tuple[int, int] | None, proofs: dict[str, Proof],
                   active: ActiveResult | None, recorded: bool) -> list[Feature]:
    features = []
    for spec in FEATURE_SPECS:
        if spec.name == "jit":
            jit = sysfs.jit_enable(root)
            kernel: bool | None = None if jit is None else jit > 0
            evidence = ("net.core.bpf_jit_enable unreadable" if jit is None
                        else f"net.core.bpf_jit_enable={jit}")
        elif spec.name == "btf":
            kernel = sysfs.btf_vmlinux(root)
            evidence = "/sys/kernel/btf/vmlinux " + ("present" if kernel else "absent")
        else:
            kernel, evidence = kernel_support(spec.kernel, syms, config, version)
        bcc, detail = _bcc_cell(spec, proofs, active, recorded)
        features.append(Feature(spec.name, spec.label, kernel, evidence, bcc, detail))
    return features


def build_crypto(root: Path, syms: sysfs.Kallsyms, proofs: dict[str, Proof]) -> CryptoInfo:
    algs = sysfs.crypto_algorithms(root) or []
    names = {a.name for a in algs}
    kfunc_proof = proofs["kfunc_call"]
    return CryptoInfo(
        kfuncs={k: (k in syms.found) if syms.readable else None for k in CRYPTO_KFUNCS},
        kfuncs_usable_by_bcc=kfunc_proof.ok,
        kfuncs_bcc_detail=kfunc_proof.detail,
        bpf_crypto_ciphers=sorted({a.name for a in algs if a.type == "lskcipher"}),
        quic_aeads={suite: alg in names for suite, alg in QUIC_AEADS.items()},
        algorithms=algs,
    )


# --- interfaces ----------------------------------------------------------------------


def build_interface(root: Path, nic: sysfs.SysfsInterface, *, live: bool) -> Interface:
    outputs = ethtool_outputs(root, nic.name, live=live)
    info = parse_driver_info(outputs.driver_info or "")
    feats = parse_features(outputs.features or "")
    loopback = sysfs.read_line(root, f"sys/class/net/{nic.name}/type") == ARPHRD_LOOPBACK
    driver = nic.driver or info.get("driver") or ("loopback" if loopback else None)
    kind = "loopback" if loopback else ("virtual" if nic.virtual else (nic.bus or "unknown bus"))
    notes = []
    if outputs.note and not loopback:
        notes.append(outputs.note)
    if driver in DRIVER_OFFLOAD_NOTES:
        notes.append(DRIVER_OFFLOAD_NOTES[driver])
    return Interface(
        name=nic.name,
        driver=driver,
        kind=kind,
        pci_vendor=nic.pci_vendor,
        vendor_name=vendor_name(nic.pci_vendor),
        pci_device=nic.pci_device,
        pci_address=nic.pci_address,
        firmware=info.get("firmware-version") or None,
        xdp_modes_known=list(xdp_modes_for(driver)),
        offload_features={k: str(feats[k]) for k in OFFLOAD_FEATURES if k in feats},
        is_nfp=is_nfp(driver, nic.pci_vendor),
        notes=notes,
    )


def _feature_on(iface: Interface, name: str) -> bool:
    return iface.offload_features.get(name, "off").startswith("on")


def build_nfp(root: Path, interfaces: list[Interface]) -> NfpInfo:
    nfps = [i for i in interfaces if i.is_nfp]
    modes: list[str] = []
    if nfps:
        modes.append("XDP offload (xdpoffload), driver table")
        if any(_feature_on(i, "hw-tc-offload") for i in nfps):
            modes.append("TC cls_bpf/flower offload (hw-tc-offload on)")
        if any(_feature_on(i, "tls-hw-tx-offload") or _feature_on(i, "tls-hw-rx-offload")
               for i in nfps):
            modes.append("kTLS crypto offload (tls-hw-*-offload on)")
        if any(_feature_on(i, "esp-hw-offload") for i in nfps):
            modes.append("IPsec ESP crypto offload (esp-hw-offload on)")
    return NfpInfo(
        driver_registered=sysfs.pci_driver_registered(root, "nfp"),
        interfaces=[i.name for i in nfps],
        offload_modes=modes,
        verified_on_hardware=False,
    )


# --- verdicts ------------------------------------------------------------------------


def _describe(iface: Interface) -> str:
    if iface.kind in ("virtual", "loopback"):
        return f"{iface.name} is {iface.driver or 'an unknown driver'} (virtual)"
    return f"{iface.name} is {iface.driver or 'driverless'} (vendor {iface.pci_vendor or 'unknown'})"


def fastpath_shortfalls(backend: str, features: list[Feature]) -> tuple[list[str], list[str]]:
    """(what is missing, what was proven) for the fast path a backend runs on."""
    by_name = {f.name: f for f in features}
    missing, basis = [], []
    for name in BACKEND_KERNEL_NEEDS[backend]:
        f = by_name[name]
        if f.kernel is False:
            missing.append(f"kernel lacks {f.label} ({f.kernel_evidence})")
        elif f.kernel is None:
            missing.append(f"cannot tell whether the kernel has {f.label}")
        elif f.bcc is False:  # --active tried to attach it and the kernel said no
            missing.append(f"{f.label} could not be used: {f.bcc_detail}")
        else:
            basis.append(f"kernel: {f.label}")
    unproven: dict[str, list[str]] = {}  # detail -> labels, so "not probed" reads once
    for name in BACKEND_BCC_NEEDS[backend]:
        f = by_name[name]
        if f.bcc is True:
            basis.append(f"bcc: {f.label}")
        elif f.bcc is False:
            missing.append(f"bcc cannot use {f.label}: {f.bcc_detail}")
        else:
            unproven.setdefault(f.bcc_detail, []).append(f.label)
    for detail, labels in unproven.items():
        missing.append(f"bcc use of {', '.join(labels)} unproven ({detail})")
    return missing, basis


def nic_shortfalls(interfaces: list[Interface], nfp: NfpInfo) -> list[str]:
    capable = [i for i in interfaces if i.driver in QUIC_CRYPTO_OFFLOAD_DRIVERS]
    if capable:
        return []
    reasons = []
    if nfp.interfaces:
        nfps = [i for i in interfaces if i.is_nfp]
        first = nfps[0]
        reasons.append(
            f"NFP found ({', '.join(nfp.interfaces)}: driver {first.driver or 'none bound'}, "
            f"vendor {first.pci_vendor}, offload modes: {'; '.join(nfp.offload_modes)}), "
            "not verified on hardware: the nfp driver offloads eBPF (without clone_redirect "
            "or kfuncs), kTLS and IPsec, not QUIC 1-RTT crypto")
    else:
        listed = ", ".join(_describe(i) for i in interfaces) or "no network interfaces found"
        reasons.append(f"no NIC with crypto offload: {listed}")
    partial = [i.name for i in interfaces if not i.is_nfp and (
        _feature_on(i, "tls-hw-tx-offload") or _feature_on(i, "esp-hw-offload"))]
    if partial:
        reasons.append(f"{', '.join(partial)} offer TLS/ESP offload, which does not cover QUIC")
    reasons.append("no mainline driver offloads QUIC 1-RTT packet protection")
    return reasons


def verdicts(features: list[Feature], interfaces: list[Interface], nfp: NfpInfo) -> list[BackendVerdict]:
    result = []
    for backend in BACKENDS:
        missing, basis = fastpath_shortfalls(backend, features)
        hw: bool | None = None
        if backend == "nic":
            # The hardware is the headline reason: list it first.
            missing = nic_shortfalls(interfaces, nfp) + missing
            hw = False
        result.append(BackendVerdict(backend, not missing, missing, basis, hw))
    return result


# --- entry points --------------------------------------------------------------------


def run_probe(root: Path = Path("/"), *, active: bool = False,
              only_interfaces: Sequence[str] = ()) -> ProbeReport:
    """Probe the machine (root "/") or a recorded tree; read-only unless `active`.

    `only_interfaces` limits the per-interface part, and so the `nic` verdict, to those
    interfaces (the ones a relay would run on); each must exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"probe root {root} does not exist or is not a directory")
    found = sysfs.list_interfaces(root)
    names = [i.name for i in found]
    unknown = [n for n in only_interfaces if n not in names]
    if unknown:
        where = "this machine" if root.resolve() == Path("/") else f"recorded tree {root}"
        raise NotFoundError(f"interface '{unknown[0]}' does not exist on {where} "
                            f"(interfaces: {', '.join(names) or 'none'})")
    live = root.resolve() == Path("/")
    if live:
        require_root("fastrelay probe")
    elif active:
        raise ConfigError("--active attaches programs on this machine; it cannot be combined "
                          "with a recorded --root")
    release = sysfs.kernel_release(root)
    version = sysfs.kernel_version_tuple(release)
    config = sysfs.kernel_config(root, release)
    symbols = {s for spec in FEATURE_SPECS for s in spec.kernel.symbols} | set(CRYPTO_KFUNCS)
    syms = sysfs.kallsyms(root, symbols)

    bcc = run_bcc_proofs() if live else BccProofs(not_probed("recorded tree"), None)
    try:
        active_result = run_active(bcc.default_module) if active else None
    finally:
        if bcc.default_module is not None:
            bcc.default_module.cleanup()  # the probe is read-only: leave nothing loaded

    version_line = sysfs.read_line(root, "proc/version")
    kernel = KernelInfo(
        release=release,
        version=version_line,
        jit=_jit_state(sysfs.jit_enable(root)),
        btf=sysfs.btf_vmlinux(root),
        bpffs=sysfs.bpffs_mounts(root),
        config_source=config.source,
        kallsyms_readable=syms.readable,
    )
    features = build_features(root, syms, config, version, bcc.proofs, active_result, not live)
    interfaces = [build_interface(root, i, live=live) for i in found
                  if not only_interfaces or i.name in only_interfaces]
    nfp = build_nfp(root, interfaces)
    return ProbeReport(
        root=str(root),
        recorded=not live,
        kernel=kernel,
        features=features,
        crypto=build_crypto(root, syms, bcc.proofs),
        interfaces=interfaces,
        nfp=nfp,
        active=active_result,
        backends=verdicts(features, interfaces, nfp),
    )


def check_backend_name(name: str) -> None:
    if name not in BACKENDS:
        raise ConfigError(f"unknown crypto backend '{name}'; valid backends: {', '.join(BACKENDS)}")


def require_backend(name: str, report: ProbeReport | None = None) -> None:
    """Raise MissingCapabilityError with the reason when backend `name` cannot run here."""
    check_backend_name(name)
    report = report if report is not None else run_probe()
    verdict = report.backend(name)
    if not verdict.usable:
        raise MissingCapabilityError(
            f"crypto backend '{name}' cannot run here: {'; '.join(verdict.reasons)}")
