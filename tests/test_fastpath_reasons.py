"""bpf/reasons.h and relay.fastpath.reasons.Reason list the same reasons, same numbers."""

from __future__ import annotations

import re

from relay.fastpath.layout import Capacities
from relay.fastpath.reasons import REASON_MAX, Reason
from relay.paths import BPF_DIR


def _header_defines(name: str) -> dict[str, int]:
    text = (BPF_DIR / name).read_text()
    return {m.group(1): int(m.group(2), 0)
            for m in re.finditer(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", text, re.M)}


def test_reasons_mirror_header() -> None:
    defines = _header_defines("reasons.h")
    assert defines.pop("FR_REASON_MAX") == REASON_MAX
    header = {name.removeprefix("FR_"): value for name, value in defines.items()}
    assert header == {r.name: r.value for r in Reason}


def test_reasons_fit_and_are_unique() -> None:
    values = [r.value for r in Reason]
    assert len(values) == len(set(values))
    assert all(0 < v < REASON_MAX for v in values)
    assert {r for r in Reason if r.is_punt} == {r for r in Reason if r.name.startswith("PUNT_")}


def test_capacities_mirror_consts() -> None:
    defines = _header_defines("consts.h")
    for name, value in Capacities().__dict__.items():
        assert defines[name.upper()] == value, name
    assert Capacities().max_subscribers_per_upstream >= 64
    assert "-DMAX_SUBSCRIBERS_PER_UPSTREAM=64" in Capacities().cflags()
