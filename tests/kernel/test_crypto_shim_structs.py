"""bpf/shim_structs.h and crypto_backends/soft_shim.py describe the same layouts (no root needed)."""

from __future__ import annotations

import ctypes
import re

import pytest

from crypto_backends import soft_shim
from crypto_backends.soft_shim import ShimConfig, ShimConn, ShimConnKey, ShimPhaseKeys, ShimStats
from relay.paths import BPF_DIR

_C_TYPES = {"__u8": ctypes.c_uint8, "__u16": ctypes.c_uint16, "__u32": ctypes.c_uint32,
            "__u64": ctypes.c_uint64}
_STRUCTS = {"shim_conn_key": ShimConnKey, "shim_phase_keys": ShimPhaseKeys, "shim_conn": ShimConn,
            "shim_config": ShimConfig, "shim_stats": ShimStats}


def _header() -> str:
    return (BPF_DIR / soft_shim.STRUCTS).read_text()


def _c_fields(name: str) -> list[tuple[str, object]]:
    body = re.search(rf"struct {name} \{{(.*?)\}};", _header(), re.S)
    assert body, f"struct {name} not in {soft_shim.STRUCTS}"
    fields = []
    for ctype, field, count in re.findall(r"^\s*((?:struct )?\w+)\s+(\w+)(?:\[(\d+)\])?;",
                                          body.group(1), re.M):
        base = _STRUCTS[ctype.split()[1]] if ctype.startswith("struct ") else _C_TYPES[ctype]
        fields.append((field, base * int(count) if count else base))
    return fields


def _same_type(a: object, b: object) -> bool:
    if isinstance(a, type) and issubclass(a, ctypes.Array):
        return (isinstance(b, type) and issubclass(b, ctypes.Array) and a._length_ == b._length_
                and a._type_ is b._type_)
    return a is b


@pytest.mark.parametrize("cname", sorted(_STRUCTS))
def test_ctypes_structs_match_shim_structs_h(cname: str) -> None:
    py = _STRUCTS[cname]._fields_
    c = _c_fields(cname)
    assert [n for n, _ in py] == [n for n, _ in c]
    for (name, pt), (_, ct) in zip(py, c):
        assert _same_type(pt, ct), name


def test_sizes_are_what_the_kernel_sees() -> None:
    # key 40 B, value 240 B: the verifier log of crypto_shim.c says ks=40, vs=240
    assert ctypes.sizeof(ShimConnKey) == 40
    assert ctypes.sizeof(ShimConn) == 240
    assert ctypes.sizeof(ShimStats) % 8 == 0


def test_constants_match_shim_structs_h() -> None:
    defines = dict(re.findall(r"#define (SHIM_\w+) (\d+)", _header()))
    for name in ("SHIM_MAX_CONNS", "SHIM_MAX_CID_LEN", "SHIM_DIR_RECV", "SHIM_DIR_SEND",
                 "SHIM_STATE_PASS", "SHIM_STATE_NO_KEYS", "SHIM_STATE_KEYS", "SHIM_PHASE_PREVIOUS"):
        assert int(defines[name]) == getattr(soft_shim, name), name
    flags = dict(re.findall(r"#define (SHIM_CONN_\w+) (0x[0-9a-f]+)", _header()))
    assert flags == {"SHIM_CONN_FASTPATH": "0x1"}
    assert soft_shim.RESET_TOKEN_SIZE == 16  # shim_conn.reset_token[16], RFC 9000 §10.3
    for name, value in flags.items():
        assert int(value, 16) == getattr(soft_shim, name), name
    source = (BPF_DIR / soft_shim.SOURCE).read_text()
    for name in (soft_shim.CONNS_MAP, soft_shim.CONFIG_MAP, soft_shim.STATS_MAP,
                 soft_shim.INGRESS_FUNCTION, soft_shim.EGRESS_FUNCTION):
        assert name in source


def test_conn_key_ports_in_network_order() -> None:
    key = ShimConnKey.from_buffer_copy(soft_shim.conn_key(("10.0.0.1", 4433), ("fd00::2", 1),
                                                          soft_shim.Direction.SEND))
    assert bytes(key.local_addr) == bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
    assert bytes(key)[32:34] == (4433).to_bytes(2, "big")
    assert key.direction == soft_shim.SHIM_DIR_SEND


def test_conn_value_refuses_other_suites() -> None:
    from aioquic.tls import CipherSuite

    from crypto_backends.base import Direction, KeyMaterial, KeyTrigger, PhaseKeys

    keys = PhaseKeys(0, bytes(32), bytes(16), bytes(12))
    m = KeyMaterial(connection=1, direction=Direction.SEND, trigger=KeyTrigger.INSTALL,
                    cipher_suite=CipherSuite.AES_128_GCM_SHA256, version=1, hp_key=bytes(16),
                    current=keys, next=PhaseKeys(1, bytes(32), bytes(16), bytes(12)))
    with pytest.raises(ValueError, match="only CHACHA20_POLY1305_SHA256"):
        soft_shim.conn_value(m, dcid_len=8)
