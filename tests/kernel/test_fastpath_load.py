"""Every fast-path program loads, at the default fan-out (64) and beyond, with room left
under the verifier's 1M processed-instruction limit; and a fan-out of 64 really clones 64
times."""

from __future__ import annotations

import ctypes

import pytest

from relay import bpfload
from relay.fastpath.layout import Capacities
from relay.fastpath.loader import STAGES, FastPath

pytestmark = pytest.mark.root

BPF_OBJ_GET_INFO_BY_FD = 15
VERIFIER_BUDGET = 250_000        # a quarter of the kernel's limit: room for what comes next


class _Attr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


def _verified_insns(fd: int) -> int:
    """struct bpf_prog_info.verified_insns (offset 216, kernel >= 5.16)."""
    buf = ctypes.create_string_buffer(256)
    bpfload._bpf(BPF_OBJ_GET_INFO_BY_FD, _Attr(bpf_fd=fd, info_len=256, info=ctypes.addressof(buf)))
    return int.from_bytes(buf.raw[216:220], "little")


@pytest.mark.parametrize("fanout", [64, 256])
def test_programs_load_within_budget(fanout: int) -> None:
    fp = FastPath(Capacities(max_subscribers_per_upstream=fanout))
    try:
        progs = {"fastpath_ingress": fp.ingress, "fastpath_egress": fp.egress,
                 "fastpath_sub_op": fp.sub_op_prog}
        progs.update({name: fp.stages[i] for i, name in STAGES.items()})
        counts = {name: _verified_insns(fn.fd) for name, fn in progs.items()}
        assert all(0 < n < VERIFIER_BUDGET for n in counts.values()), counts
    finally:
        fp.close()


def test_default_fanout_is_at_least_64() -> None:
    assert Capacities().max_subscribers_per_upstream >= 64
