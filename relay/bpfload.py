"""Compiling and loading the programs in bpf/ with bcc, and the raw BPF syscalls bcc lacks.

Every failure here becomes a MissingCapabilityError with one line saying what is missing,
because these are the first things to fail on a machine that is not set up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

from relay.errors import FastrelayError, MissingCapabilityError
from relay.paths import BPF_DIR

SETUP_HINT = "run hw/setup.sh as root"

# https://www.kernel.org/doc/html/latest/userspace-api/ebpf/syscall.html (enum bpf_cmd)
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_PROG_TEST_RUN = 10
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
#: struct bpf_prog_info: where `name` (BPF_OBJ_NAME_LEN = 16 bytes) starts, and a size that
#: covers it (the kernel fills what fits and zeroes nothing beyond info_len).
_PROG_INFO_NAME_OFFSET = 64
_PROG_INFO_LEN = 80
_NR_BPF = {"x86_64": 321, "aarch64": 280}


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise MissingCapabilityError(f"{what} needs root (CAP_BPF, CAP_NET_ADMIN); rerun as root")


def import_bcc() -> ModuleType:
    try:
        import bcc
    except ImportError as exc:
        raise MissingCapabilityError(
            f"bcc is not importable in this Python ({exc}); {SETUP_HINT}"
        ) from None
    return bcc


def kernel_headers_available() -> bool:
    """bcc compiles against these; hw/setup.sh provides them on kernels that ship none."""
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return Path(os.environ["BCC_KERNEL_SOURCE"], "include/linux/kconfig.h").exists()
    build = Path("/lib/modules", platform.release(), "build")
    return (build / "include/linux/kconfig.h").exists() or Path("/sys/kernel/kheaders.tar.xz").exists()


def compile_source(text: str, *, cflags: Iterable[str] = (), what: str = "eBPF program") -> Any:
    """Compile C text with bcc (include path: bpf/) and return the bcc.BPF object."""
    bcc = import_bcc()
    if not kernel_headers_available():
        raise MissingCapabilityError(
            f"no kernel headers for bcc at /lib/modules/{platform.release()}/build; {SETUP_HINT}"
        )
    flags = [f"-I{BPF_DIR}", *cflags]
    try:
        return bcc.BPF(text=text.encode(), cflags=flags)
    except Exception as exc:  # bcc raises bare Exception for compile and load failures
        raise FastrelayError(f"cannot compile {what}: {str(exc).splitlines()[0]}") from None


def compile_program(source_name: str, *, cflags: Iterable[str] = ()) -> Any:
    """Compile bpf/<source_name> with bcc."""
    path = BPF_DIR / source_name
    if not path.is_file():
        raise FastrelayError(f"fastrelay is installed without {path}")
    return compile_source(path.read_text(), cflags=cflags, what=source_name)


def load_sched_cls(bpf: Any, function: str) -> Any:
    """Load one function of a compiled module as a TC (SCHED_CLS) program."""
    bcc = import_bcc()
    try:
        return bpf.load_func(function.encode(), bcc.BPF.SCHED_CLS)
    except Exception as exc:
        raise FastrelayError(f"the kernel refused eBPF program {function}: {exc}") from None


# --- raw syscalls --------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise MissingCapabilityError(f"unsupported architecture {platform.machine()}")
    ret = _libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


class _TestRunAttr(ctypes.Structure):
    # union bpf_attr, the anonymous 'test' member used by BPF_PROG_TEST_RUN
    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class TestRunResult:
    retval: int
    data: bytes
    duration_ns: int
    ctx: bytes


def prog_test_run(
    prog_fd: int, data: bytes, *, ctx: bytes | None = None, repeat: int = 1, out_size: int = 16384
) -> TestRunResult:
    """Run a loaded program on a crafted packet (BPF_PROG_TEST_RUN) and return what it did."""
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(out_size)
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(data),
        data_size_out=out_size,
        data_in=ctypes.addressof(data_in),
        data_out=ctypes.addressof(data_out),
        repeat=repeat,
    )
    ctx_in = ctx_out = None
    if ctx is not None:
        ctx_in = ctypes.create_string_buffer(ctx, len(ctx))
        ctx_out = ctypes.create_string_buffer(len(ctx))
        attr.ctx_in, attr.ctx_size_in = ctypes.addressof(ctx_in), len(ctx)
        attr.ctx_out, attr.ctx_size_out = ctypes.addressof(ctx_out), len(ctx)
    _bpf(BPF_PROG_TEST_RUN, attr)
    return TestRunResult(
        retval=attr.retval,
        data=data_out.raw[: attr.data_size_out],
        duration_ns=attr.duration,
        ctx=ctx_out.raw[: attr.ctx_size_out] if ctx_out is not None else b"",
    )


class _ObjAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
        ("path_fd", ctypes.c_int32),
        ("_pad", ctypes.c_uint32),
    ]


def obj_pin(fd: int, path: str | Path) -> None:
    """Pin a map or program fd at a bpffs path so it outlives this process."""
    raw = ctypes.create_string_buffer(os.fsencode(str(path)))
    _bpf(BPF_OBJ_PIN, _ObjAttr(pathname=ctypes.addressof(raw), bpf_fd=fd))


def obj_get(path: str | Path) -> int:
    """Open a pinned map or program; the caller closes the returned fd."""
    raw = ctypes.create_string_buffer(os.fsencode(str(path)))
    return _bpf(BPF_OBJ_GET, _ObjAttr(pathname=ctypes.addressof(raw)))


class _GetIdAttr(ctypes.Structure):
    # union bpf_attr, the BPF_*_GET_FD_BY_ID member
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    # union bpf_attr, the 'info' member used by BPF_OBJ_GET_INFO_BY_FD
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


def prog_name(prog_id: int) -> str | None:
    """The name a loaded program was given (the kernel keeps 15 characters), None if the
    program is gone."""
    try:
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, _GetIdAttr(id=prog_id))
    except OSError:
        return None
    try:
        info = ctypes.create_string_buffer(_PROG_INFO_LEN)
        _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=_PROG_INFO_LEN,
                                               info=ctypes.addressof(info)))
    except OSError:
        return None
    finally:
        os.close(fd)
    raw = info.raw[_PROG_INFO_NAME_OFFSET:_PROG_INFO_NAME_OFFSET + 16]
    return raw.split(b"\0", 1)[0].decode(errors="replace")


class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """Look a key up in a map by fd; per-CPU maps return value_size * possible CPUs bytes."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM,
             _MapElemAttr(map_fd=map_fd, key=ctypes.addressof(k), value=ctypes.addressof(v)))
    except FileNotFoundError:
        return None
    return v.raw


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    """Write one element of a map by fd (flags 0 = BPF_ANY); per-CPU maps: a value per CPU."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _bpf(BPF_MAP_UPDATE_ELEM, _MapElemAttr(map_fd=map_fd, key=ctypes.addressof(k),
                                           value=ctypes.addressof(v), flags=flags))


def possible_cpus() -> int:
    """Number of possible CPUs, the stride of per-CPU map values."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count
