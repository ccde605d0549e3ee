"""ethtool facts per interface: from the live `ethtool` binary, or from a recorded tree.

A recorded tree stores what `ethtool -i IF` and `ethtool -k IF` printed on the recorded
host, verbatim, at (relative to the tree's root):

    recorded/ethtool/<ifname>/ethtool-i.txt     driver, version, firmware-version, bus-info
    recorded/ethtool/<ifname>/ethtool-k.txt     the feature list ("name: on|off [fixed]")

so the same parsers read both. Parsing is pure; only `ethtool_outputs` touches the system.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from offload.sysfs import read_text

RECORDED_ETHTOOL_DIR = "recorded/ethtool"
#: ethtool answers from the kernel in milliseconds; a hung driver must not hang the probe.
ETHTOOL_TIMEOUT_S = 5.0

#: The offload features the probe reports (ethtool -k names).
OFFLOAD_FEATURES = (
    "hw-tc-offload",
    "tls-hw-tx-offload",
    "tls-hw-rx-offload",
    "esp-hw-offload",
    "macsec-hw-offload",
    "tx-udp-segmentation",
)


@dataclass(frozen=True)
class EthtoolFeature:
    on: bool
    fixed: bool  # "[fixed]": the driver cannot change it

    def __str__(self) -> str:
        return ("on" if self.on else "off") + (" [fixed]" if self.fixed else "")


def parse_features(text: str) -> dict[str, EthtoolFeature]:
    """`ethtool -k` output -> {feature: EthtoolFeature}; '[requested on]' counts as off."""
    features: dict[str, EthtoolFeature] = {}
    for line in text.splitlines():
        name, sep, rest = line.strip().partition(":")
        if not sep or not rest.strip() or name.startswith("Features for"):
            continue
        words = rest.split()
        if words[0] not in ("on", "off"):
            continue
        features[name] = EthtoolFeature(on=words[0] == "on", fixed="[fixed]" in rest)
    return features


def parse_driver_info(text: str) -> dict[str, str]:
    """`ethtool -i` output -> {'driver': 'nfp', 'bus-info': '0000:04:00.0', ...}."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


@dataclass(frozen=True)
class EthtoolOutputs:
    driver_info: str | None  # `ethtool -i`
    features: str | None     # `ethtool -k`
    note: str | None         # why one is missing


def _run_ethtool(flag: str, ifname: str) -> tuple[str | None, str | None]:
    try:
        proc = subprocess.run(["ethtool", flag, ifname], capture_output=True, text=True,
                              timeout=ETHTOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"ethtool {flag} {ifname} timed out after {ETHTOOL_TIMEOUT_S:g}s"
    except OSError as exc:
        return None, f"ethtool {flag} {ifname}: {exc.strerror}"
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[0]
        return None, f"ethtool {flag} {ifname}: {first}"
    return proc.stdout, None


def ethtool_outputs(root: Path, ifname: str, *, live: bool) -> EthtoolOutputs:
    """The two ethtool outputs for one interface, run live or read from the recorded tree."""
    if not live:
        base = f"{RECORDED_ETHTOOL_DIR}/{ifname}"
        info = read_text(root, f"{base}/ethtool-i.txt")
        feats = read_text(root, f"{base}/ethtool-k.txt")
        note = None if info is not None and feats is not None else f"no recorded ethtool output in {base}/"
        return EthtoolOutputs(info, feats, note)
    if shutil.which("ethtool") is None:
        return EthtoolOutputs(None, None, "ethtool is not installed (apt-get install ethtool)")
    info, note_i = _run_ethtool("-i", ifname)
    feats, note_k = _run_ethtool("-k", ifname)
    return EthtoolOutputs(info, feats, note_i or note_k)
