"""`fastrelay probe`: the real machine (root), the recorded NFP and veth trees, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from offload.probe import ProbeReport, require_backend, run_probe
from relay.errors import ConfigError, MissingCapabilityError, NotFoundError
from tests.conftest import run_cli

SYSROOTS = Path(__file__).parent / "data" / "sysroots"
NFP = SYSROOTS / "nfp-host"
VETH = SYSROOTS / "veth-host"
NOT_PROBED = "not probed: recorded tree"


def _one_line(text: str) -> None:
    assert text.strip() and "\n" not in text.strip(), f"expected one line, got {text!r}"


# --- the recorded NFP host -------------------------------------------------------------

@pytest.fixture(scope="module")
def nfp_report() -> ProbeReport:
    return run_probe(NFP)


def test_nfp_tree_reports_the_nfp_and_its_offload_modes(nfp_report: ProbeReport) -> None:
    nfp = nfp_report.nfp
    assert nfp.driver_registered
    assert nfp.interfaces == ["enp4s0np0", "enp4s0np1"]
    assert nfp.offload_modes == ["XDP offload (xdpoffload), driver table",
                                 "TC cls_bpf/flower offload (hw-tc-offload on)"]
    assert nfp.verified_on_hardware is False
    port = next(i for i in nfp_report.interfaces if i.name == "enp4s0np0")
    assert (port.driver, port.pci_vendor, port.vendor_name) == ("nfp", "0x19ee", "Netronome")
    assert port.xdp_modes_known == ["native", "generic", "offload"]
    assert port.offload_features["hw-tc-offload"] == "on"
    assert port.offload_features["tls-hw-tx-offload"] == "off [fixed]"
    assert port.firmware == "0.0.3.5 0.25 bpf-2.0.6.124 ebpf"
    other = next(i for i in nfp_report.interfaces if i.name == "eno1")
    assert not other.is_nfp and other.driver == "igb"


def test_nfp_tree_nic_verdict_says_not_verified_on_hardware(nfp_report: ProbeReport) -> None:
    nic = nfp_report.backend("nic")
    assert not nic.usable and nic.verified_on_hardware is False
    assert nic.reasons[0].startswith("NFP found (enp4s0np0, enp4s0np1: driver nfp, vendor 0x19ee")
    assert "not verified on hardware" in nic.reasons[0]
    with pytest.raises(MissingCapabilityError,
                       match=r"^crypto backend 'nic' cannot run here: NFP found .*not verified"):
        require_backend("nic", nfp_report)


def test_nfp_tree_kernel_side_without_bcc_proofs(nfp_report: ProbeReport) -> None:
    assert nfp_report.recorded and nfp_report.kernel.release == "6.1.0-18-amd64"
    bpf_loop = nfp_report.feature("bpf_loop")
    assert bpf_loop.kernel is True and bpf_loop.bcc is None and bpf_loop.bcc_detail == NOT_PROBED
    kfunc = nfp_report.feature("kfunc_call")  # 6.1 predates the BPF crypto API
    assert kfunc.kernel is False and kfunc.kernel_evidence == "bpf_crypto_ctx_create not in kallsyms"
    assert nfp_report.crypto.kfuncs["bpf_crypto_encrypt"] is False
    assert nfp_report.crypto.quic_aeads == {"aes-128-gcm": True, "chacha20-poly1305": True}
    assert nfp_report.crypto.bpf_crypto_ciphers == []
    # No recorded tree can prove bcc: none/soft are refused with that reason, not passed.
    for name in ("none", "soft"):
        verdict = nfp_report.backend(name)
        assert not verdict.usable
        assert verdict.reasons == [f"bcc use of {', '.join(verdict_labels(name))} unproven "
                                   f"({NOT_PROBED})"]


def verdict_labels(backend: str) -> list[str]:
    base = ["TC (SCHED_CLS) programs", "bpf_clone_redirect", "ring buffer", "atomic fetch-and-add"]
    return base + (["bounded loops", "per-CPU array"] if backend == "soft" else [])


def test_cli_nfp_tree_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    table = run_cli(["probe", "--root", str(NFP)], capsys).stdout
    assert "Netronome NFP" in table and "not verified on hardware" in table
    assert "enp4s0np0" in table and "XDP offload (xdpoffload)" in table
    data = json.loads(run_cli(["probe", "--root", str(NFP), "--json"], capsys).stdout)
    assert set(data) == {"root", "recorded", "kernel", "features", "crypto", "interfaces", "nfp",
                         "active", "backends"}
    assert data["nfp"]["interfaces"] == ["enp4s0np0", "enp4s0np1"]
    nic = next(b for b in data["backends"] if b["name"] == "nic")
    assert nic["usable"] is False and nic["verified_on_hardware"] is False
    assert data["active"] is None


def test_cli_nfp_tree_require_nic_fails_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(["probe", "--root", str(NFP), "--require", "nic"], capsys, exit_code=1,
                     stderr=r"^error: crypto backend 'nic' cannot run here: NFP found \(enp4s0np0")
    _one_line(result.stderr)
    assert result.stdout == ""


# --- the recorded veth host and crafted trees ------------------------------------------

def test_veth_tree_nic_reason_names_the_missing_hardware() -> None:
    report = run_probe(VETH)
    nic = report.backend("nic")
    assert nic.reasons[0] == ("no NIC with crypto offload: eth0 is virtio_net (vendor 0x1af4), "
                              "lo is loopback (virtual), veth0 is veth (virtual)")
    assert not report.nfp.interfaces and not report.nfp.driver_registered
    veth0 = next(i for i in report.interfaces if i.name == "veth0")
    assert veth0.xdp_modes_known == ["native", "generic"] and veth0.kind == "virtual"
    assert report.crypto.bpf_crypto_ciphers == ["cbc(aes)", "ecb(aes)"]
    assert all(report.crypto.kfuncs.values())


def test_kernel_without_cls_bpf_refuses_every_backend(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/kallsyms").write_text("0 t __sys_bpf\n0 t clsact_init\n")
    report = run_probe(tmp_path)
    for name in ("none", "soft", "nic"):
        assert "kernel lacks cls_bpf classifier (cls_bpf_classify not in kallsyms)" in \
            report.backend(name).reasons
    assert report.backend("nic").reasons[0] == "no NIC with crypto offload: no network interfaces found"


def test_tls_offload_is_mentioned_but_not_enough(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(VETH, tree, symlinks=True)
    features = tree / "recorded/ethtool/eth0/ethtool-k.txt"
    features.write_text(features.read_text().replace("tls-hw-tx-offload: off [fixed]",
                                                     "tls-hw-tx-offload: on"))
    nic = run_probe(tree).backend("nic")
    assert "eth0 offer TLS/ESP offload, which does not cover QUIC" in nic.reasons


# --- bad input -------------------------------------------------------------------------

def test_unknown_backend(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(["probe", "--require", "rot13"], capsys, exit_code=1,
                     stderr=r"^error: unknown crypto backend 'rot13'; valid backends: none, soft, nic$")
    _one_line(result.stderr)
    with pytest.raises(ConfigError, match="valid backends: none, soft, nic"):
        require_backend("NIC")


def test_missing_root(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = run_cli(["probe", "--root", str(missing)], capsys, exit_code=1,
                     stderr=rf"^error: probe root {missing} does not exist or is not a directory$")
    _one_line(result.stderr)
    with pytest.raises(NotFoundError):
        run_probe(missing)


def test_not_root(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = run_cli(["probe"], capsys, exit_code=1,
                     stderr=r"^error: fastrelay probe needs root \(CAP_BPF, CAP_NET_ADMIN\); rerun as root$")
    _one_line(result.stderr)
    # A recorded tree is plain files: reading it needs no privilege.
    run_cli(["probe", "--root", str(VETH), "--json"], capsys)


def test_active_with_recorded_root_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(["probe", "--root", str(NFP), "--active"], capsys, exit_code=1,
                     stderr=r"^error: --active attaches programs on this machine")
    _one_line(result.stderr)


# --- the real machine ------------------------------------------------------------------

@pytest.fixture(scope="module")
def live_report() -> ProbeReport:
    if os.geteuid() != 0:
        pytest.skip("needs root (BPF)")
    return run_probe()


@pytest.mark.root
def test_live_soft_and_none_prerequisites_present(live_report: ProbeReport) -> None:
    for name in ("none", "soft"):
        verdict = live_report.backend(name)
        assert verdict.usable, verdict.reasons
        assert verdict.reasons == [] and verdict.verified_on_hardware is None
    for feature in ("sched_cls", "clone_redirect", "ringbuf", "atomics", "spin_lock",
                    "bounded_loops", "percpu_array"):
        f = live_report.feature(feature)
        assert f.kernel is True and f.bcc is True, f
    assert live_report.feature("atomics").bcc_detail == "loads; test-run returned 0 then 1"


@pytest.mark.root
def test_live_kernel_has_bpf_loop_and_crypto_kfuncs_bcc_cannot_use(live_report: ProbeReport) -> None:
    bpf_loop = live_report.feature("bpf_loop")
    assert bpf_loop.kernel is True and bpf_loop.kernel_evidence == "kallsyms: bpf_loop"
    assert bpf_loop.bcc is False and "R2 type=scalar expected=func" in bpf_loop.bcc_detail
    kfunc = live_report.feature("kfunc_call")
    assert kfunc.kernel is True and kfunc.bcc is False
    assert "cannot call non-static helper function" in kfunc.bcc_detail
    assert live_report.crypto.kfuncs_usable_by_bcc is False
    assert "ecb(aes)" in live_report.crypto.bpf_crypto_ciphers


@pytest.mark.root
def test_live_nic_refused_naming_the_missing_hardware(live_report: ProbeReport) -> None:
    nic = live_report.backend("nic")
    assert not nic.usable and nic.verified_on_hardware is False
    assert nic.reasons[0].startswith("no NIC with crypto offload: ")
    for iface in live_report.interfaces:
        assert f"{iface.name} is {iface.driver}" in nic.reasons[0]
    eth0 = next((i for i in live_report.interfaces if i.name == "eth0"), None)
    if eth0 is not None and eth0.driver == "virtio_net":
        assert "eth0 is virtio_net (vendor 0x1af4)" in nic.reasons[0]
    with pytest.raises(MissingCapabilityError, match=r"^crypto backend 'nic' cannot run here: no NIC"):
        require_backend("nic", live_report)
    require_backend("none", live_report)
    require_backend("soft", live_report)


@pytest.mark.root
def test_cli_live_table_json_and_require(capsys: pytest.CaptureFixture[str]) -> None:
    table = run_cli(["probe"], capsys).stdout
    for title in ("Kernel", "BPF features", "Kernel crypto", "Interfaces", "Crypto backends"):
        assert title in table
    data = json.loads(run_cli(["probe", "--json"], capsys).stdout)
    assert data["recorded"] is False
    verdicts = {b["name"]: b["usable"] for b in data["backends"]}
    assert verdicts == {"none": True, "soft": True, "nic": False}
    result = run_cli(["probe", "--require", "nic"], capsys, exit_code=1,
                     stderr=r"^error: crypto backend 'nic' cannot run here: no NIC with crypto offload: ")
    _one_line(result.stderr)
    assert result.stdout == ""
    ok = run_cli(["probe", "--require", "soft"], capsys)
    assert ok.stdout.strip() == "crypto backend 'soft' can run here"


def _netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.mark.root
def test_cli_live_active_proves_xdp_modes_on_a_scratch_veth(capsys: pytest.CaptureFixture[str]) -> None:
    before_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                                  timeout=10).stdout
    data = json.loads(run_cli(["probe", "--active", "--json"], capsys).stdout)
    active = data["active"]
    assert active["namespace"].startswith("frprobe-")
    assert active["xdp"]["native"] == "attached" and active["xdp"]["generic"] == "attached"
    assert active["xdp"]["offload"].startswith("refused: ")  # veth has no hardware offload
    assert active["clsact_cls_bpf"] == "attached"
    clsact = next(f for f in data["features"] if f["name"] == "clsact")
    assert clsact["bcc"] is True
    # The scratch namespace is gone and the host's interfaces are as they were.
    assert active["namespace"] not in _netns_names()
    after_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                                 timeout=10).stdout
    assert after_links == before_links


def test_missing_interface_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli(["probe", "--root", str(NFP), "--interface", "nope0"], capsys, exit_code=1)
    assert result.stderr.count("\n") == 1
    assert "error: interface 'nope0' does not exist on recorded tree" in result.stderr
    assert "enp4s0np0" in result.stderr  # names the interfaces that do exist


def test_interface_option_limits_the_report_and_the_nic_verdict() -> None:
    report = run_probe(NFP, only_interfaces=["eno1"])
    assert [i.name for i in report.interfaces] == ["eno1"]
    assert not report.nfp.interfaces  # the NFP ports were not asked about
    nic = report.backend("nic")
    assert not nic.usable and any("eno1" in reason for reason in nic.reasons)
