"""Unit tests of the probe's readers and pure helpers, against the recorded trees and crafted text."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from offload import sysfs
from offload.bcc_proofs import compile_error_line, has_back_edge, verifier_reason
from offload.ethtool import ethtool_outputs, parse_driver_info, parse_features
from offload.knowledge import is_nfp, xdp_modes_for
from offload.probe import KernelSign, kernel_support

SYSROOTS = Path(__file__).parent / "data" / "sysroots"
NFP = SYSROOTS / "nfp-host"
VETH = SYSROOTS / "veth-host"


# --- ethtool ---------------------------------------------------------------------------

def test_parse_features_on_off_fixed_and_requested() -> None:
    text = ("Features for v0:\n"
            "tx-checksumming: on\n"
            "\ttx-checksum-ipv4: off [fixed]\n"
            "hw-tc-offload: off [requested on]\n"
            "tls-hw-tx-offload: on [fixed]\n")
    feats = parse_features(text)
    assert str(feats["tx-checksumming"]) == "on"
    assert str(feats["tx-checksum-ipv4"]) == "off [fixed]"
    assert feats["hw-tc-offload"].on is False  # asked for, refused by the driver
    assert feats["tls-hw-tx-offload"].on and feats["tls-hw-tx-offload"].fixed
    assert "Features for v0" not in feats


def test_parse_driver_info_recorded_nfp() -> None:
    info = parse_driver_info((NFP / "recorded/ethtool/enp4s0np0/ethtool-i.txt").read_text())
    assert info["driver"] == "nfp"
    assert info["bus-info"] == "0000:04:00.0"
    assert info["firmware-version"].endswith("ebpf")
    assert info["expansion-rom-version"] == ""


def test_recorded_ethtool_missing_is_a_note_not_an_error(tmp_path: Path) -> None:
    out = ethtool_outputs(tmp_path, "eth9", live=False)
    assert out.driver_info is None and out.features is None
    assert out.note == "no recorded ethtool output in recorded/ethtool/eth9/"


# --- procfs ----------------------------------------------------------------------------

def test_kernel_release_from_osrelease_and_from_proc_version(tmp_path: Path) -> None:
    assert sysfs.kernel_release(NFP) == "6.1.0-18-amd64"
    assert sysfs.kernel_release(VETH).startswith("6.18.")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/version").write_text("Linux version 5.15.0-91-generic (buildd@x) #1 SMP\n")
    assert sysfs.kernel_release(tmp_path) == "5.15.0-91-generic"
    assert sysfs.kernel_version_tuple("5.15.0-91-generic") == (5, 15)
    assert sysfs.kernel_version_tuple(None) is None


def test_jit_btf_bpffs_from_recorded_tree() -> None:
    assert sysfs.jit_enable(NFP) == 1
    assert sysfs.btf_vmlinux(NFP)
    assert sysfs.bpffs_mounts(NFP) == ["/sys/fs/bpf"]


def test_kallsyms_reads_module_symbols_and_reports_unreadable(tmp_path: Path) -> None:
    syms = sysfs.kallsyms(NFP, {"clsact_init", "nfp_bpf_xdp_offload", "bpf_crypto_ctx_create"})
    assert syms.readable
    assert syms.found == {"clsact_init", "nfp_bpf_xdp_offload"}  # "[sch_ingress]" suffix ok
    assert sysfs.kallsyms(tmp_path, {"bpf_loop"}) == sysfs.Kallsyms(False, frozenset())


def test_kernel_config_plain_boot_file_and_absent(tmp_path: Path) -> None:
    config = sysfs.kernel_config(NFP, "6.1.0-18-amd64")
    assert config.source == "/boot/config-6.1.0-18-amd64"
    assert config.get("CONFIG_NFP") == "m"
    assert config.get("CONFIG_NETDEVSIM") == "n"       # "# ... is not set"
    assert config.get("CONFIG_NOT_MENTIONED") == "n"   # absent from a known config
    assert sysfs.kernel_config(tmp_path, "6.1.0").get("CONFIG_BPF_SYSCALL") is None


def test_proc_crypto_recorded_trees() -> None:
    veth = {(a.name, a.type) for a in sysfs.crypto_algorithms(VETH) or []}
    assert ("ecb(aes)", "lskcipher") in veth
    assert not any(name == "gcm(aes)" for name, _ in veth)  # CONFIG_CRYPTO_GCM unset there
    nfp = {a.name: a for a in sysfs.crypto_algorithms(NFP) or []}
    assert nfp["gcm(aes)"].type == "aead" and nfp["gcm(aes)"].priority == 400


# --- sysfs interfaces ------------------------------------------------------------------

def test_list_interfaces_nfp_tree() -> None:
    by_name = {i.name: i for i in sysfs.list_interfaces(NFP)}
    assert sorted(by_name) == ["eno1", "enp4s0np0", "enp4s0np1", "lo"]
    nfp = by_name["enp4s0np0"]
    assert (nfp.driver, nfp.bus, nfp.pci_vendor, nfp.pci_device) == ("nfp", "pci", "0x19ee", "0x4000")
    assert nfp.pci_address == "0000:04:00.0" and nfp.phys_port_name == "p0"
    assert by_name["eno1"].driver == "igb" and by_name["eno1"].pci_vendor == "0x8086"
    assert by_name["lo"].virtual and by_name["lo"].driver is None
    assert sysfs.pci_driver_registered(NFP, "nfp")
    assert not sysfs.pci_driver_registered(VETH, "nfp")


def test_list_interfaces_veth_tree_takes_vendor_from_the_pci_function() -> None:
    by_name = {i.name: i for i in sysfs.list_interfaces(VETH)}
    eth0 = by_name["eth0"]
    assert (eth0.driver, eth0.bus, eth0.pci_address) == ("virtio_net", "virtio", "0000:00:03.0")
    assert (eth0.pci_vendor, eth0.pci_device) == ("0x1af4", "0x1041")  # not virtio2's 0x0001
    assert by_name["veth0"].virtual and by_name["veth0"].pci_vendor is None


def test_empty_tree_reads_as_nothing(tmp_path: Path) -> None:
    assert sysfs.list_interfaces(tmp_path) == []
    assert sysfs.kernel_release(tmp_path) is None
    assert sysfs.jit_enable(tmp_path) is None
    assert sysfs.bpffs_mounts(tmp_path) == []
    assert sysfs.crypto_algorithms(tmp_path) is None


# --- knowledge and kernel evidence -----------------------------------------------------

def test_nfp_detected_by_driver_or_vendor_alone() -> None:
    assert is_nfp("nfp", None)
    assert is_nfp(None, "0x19EE")  # function present, driver not bound
    assert not is_nfp("virtio_net", "0x1af4")
    assert xdp_modes_for("nfp") == ("native", "generic", "offload")
    assert xdp_modes_for("ifb") == ("generic",)


@pytest.mark.parametrize("readable,found,config,version,expected", [
    (True, {"bpf_loop"}, {}, (5, 10), (True, "kallsyms: bpf_loop")),
    (True, set(), {}, (6, 1), (False, "bpf_loop not in kallsyms")),
    (False, set(), {"CONFIG_X": "y"}, None, (True, "CONFIG_X=y")),
    (False, set(), {"CONFIG_X": "n"}, None, (False, "CONFIG_X is not set (/boot/config-t)")),
    (False, set(), None, (5, 17), (True, "kernel >= 5.17")),
    (False, set(), None, (5, 16), (False, "kernel 5.16 < 5.17")),
    (False, set(), None, None, (None, "this tree does not say")),
], ids=["symbol", "no-symbol", "config-y", "config-unset", "version-new", "version-old", "unknown"])
def test_kernel_support_prefers_symbols_then_config_then_version(
        readable: bool, found: set[str], config: dict[str, str] | None,
        version: tuple[int, int] | None, expected: tuple[bool | None, str]) -> None:
    sign = KernelSign(("bpf_loop",), ("CONFIG_X",), (5, 17))
    cfg = sysfs.KernelConfig(None if config is None else "/boot/config-t", config or {})
    assert kernel_support(sign, sysfs.Kallsyms(readable, frozenset(found)), cfg, version) == expected


# --- turning compiler and verifier output into one line --------------------------------

BPF_LOOP_LOG = """bpf: Failed to load program: Permission denied
0: R1=ctx() R10=fp0
; bpf_loop(4, probe_loop_step, NULL, 0); @ main.c:37
0: (b7) r1 = 4                        ; R1=4
5: (85) call bpf_loop#181
R2 type=scalar expected=func
processed 5 insns (limit 1000000) max_states_per_insn 0 total_states 1 peak_states 1 mark_read 0

"""


def test_verifier_reason_is_the_complaint_line() -> None:
    assert verifier_reason(BPF_LOOP_LOG) == "R2 type=scalar expected=func"
    assert verifier_reason("") is None


def test_compile_error_line_strips_the_location() -> None:
    log = ("/virtual/main.c:42:2: error: cannot call non-static helper function\n"
           "        bpf_dynptr_from_skb(skb, 0, &ptr);\n1 error generated.\n")
    assert compile_error_line(log) == "cannot call non-static helper function"
    assert compile_error_line("warning: only a warning\n") is None


def _insn(opcode: int, off: int = 0) -> bytes:
    return struct.pack("<BBhi", opcode, 0, off, 0)


def test_has_back_edge_sees_loops_not_calls_or_forward_jumps() -> None:
    exit_ = _insn(0x95)
    forward = _insn(0xb7) + _insn(0x15, 1) + _insn(0xb7) + exit_   # if r0 == 0 goto +1
    backward = _insn(0xb7) + _insn(0x07) + _insn(0x5d, -2) + exit_  # jne back to insn 1
    call = _insn(0x85, -1) + exit_                                  # call: off is not a jump
    assert not has_back_edge(forward)
    assert has_back_edge(backward)
    assert not has_back_edge(call)
