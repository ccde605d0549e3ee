"""relay/fastpath/layout.py against bpf/structs.h: sizeof and offsetof of every field,
measured by a probe program compiled with bcc (the compiler the programs use)."""

from __future__ import annotations

import ctypes

import pytest

from relay import bpfload
from relay.fastpath import layout
from relay.fastpath.loader import expand_includes
from relay.paths import BPF_DIR

pytestmark = pytest.mark.root


def _items() -> list[tuple[str, str | None, int]]:
    """(struct, field or None for sizeof, expected value) for every mirror."""
    out = []
    for cname, cls in layout.MIRRORS.items():
        out.append((cname, None, ctypes.sizeof(cls)))
        for field, *_ in cls._fields_:
            out.append((cname, field, getattr(cls, field).offset))
    return out


def test_structs_match_header() -> None:
    items = _items()
    lines = ["#include <uapi/linux/bpf.h>", expand_includes(BPF_DIR / "structs.h"),
             f"BPF_ARRAY(probe, u64, {len(items)});",
             "int layout_probe(struct __sk_buff *skb) {", "  u32 k; u64 v;"]
    for i, (cname, field, _) in enumerate(items):
        expr = f"sizeof(struct {cname})" if field is None else \
            f"__builtin_offsetof(struct {cname}, {field})"
        lines.append(f"  k = {i}; v = {expr}; probe.update(&k, &v);")
    lines += ["  return 0;", "}"]
    bpf = bpfload.compile_source("\n".join(lines), what="layout probe")
    try:
        fn = bpfload.load_sched_cls(bpf, "layout_probe")
        bpfload.prog_test_run(fn.fd, bytes(64))
        fd = bpf.get_table(b"probe").map_fd
        got = {}
        for i, (cname, field, expected) in enumerate(items):
            raw = bpfload.map_lookup(fd, i.to_bytes(4, "little"), 8)
            got[(cname, field)] = (int.from_bytes(raw, "little"), expected)
        wrong = {k: v for k, v in got.items() if v[0] != v[1]}
        assert not wrong, f"(C, Python) differ: {wrong}"
    finally:
        bpf.cleanup()


def test_field_names_cover_header() -> None:
    """Every struct of structs.h has a mirror."""
    import re
    text = (BPF_DIR / "structs.h").read_text()
    assert set(re.findall(r"^struct (\w+) \{", text, re.M)) == set(layout.MIRRORS)
